"""Architecture dimensions of the models the planner knows, and parameter counts derived from them.

Counts come from the dims (layers, hidden, heads, kv heads, vocab, intermediate), never from a
hard-coded total, so a real config (HF `config.json`, GGUF metadata, openai-whisper dims) gives the
same numbers as the built-in table. Known checks: Whisper tiny.en = 37,184,256 parameters + the
576,000-element encoder position table (CTranslate2 model.bin, baseline-cpu.md §2); SmolLM2-135M =
134,515,008 = the tensor elements of the GGUF file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Union

from edge_mmm.errors import InputError, ModelFileError


@dataclass(frozen=True)
class WhisperSpec:
    """openai-whisper `ModelDimensions` plus a name."""

    name: str
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def encoder_params(self) -> int:
        d = self.n_audio_state
        conv = self.n_mels * d * 3 + d + d * d * 3 + d
        # q(w,b) k(w) v(w,b) out(w,b) + attn_ln + fc1(w,b) fc2(w,b) + mlp_ln
        block = 4 * d * d + 3 * d + 2 * d + 8 * d * d + 5 * d + 2 * d
        pos = self.n_audio_ctx * d  # sinusoid buffer, stored in every checkpoint
        return conv + pos + self.n_audio_layer * block + 2 * d

    def decoder_params(self) -> int:
        d = self.n_text_state
        emb = self.n_vocab * d + self.n_text_ctx * d  # output projection is tied to the embedding
        block = 2 * (4 * d * d + 3 * d + 2 * d) + 8 * d * d + 5 * d + 2 * d  # self + cross attn, mlp
        return emb + self.n_text_layer * block + 2 * d

    def param_count(self) -> int:
        return self.encoder_params() + self.decoder_params()


def _whisper(name, n_vocab, d, heads, layers) -> WhisperSpec:
    return WhisperSpec(name, 80, 1500, d, heads, layers, n_vocab, 448, d, heads, layers)


# openai-whisper `_MODELS` dims (whisper/__init__.py checkpoints); .en vocab 51864, multilingual 51865.
WHISPER: Dict[str, WhisperSpec] = {}
for _size, (_d, _h, _l) in {"tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12)}.items():
    WHISPER[_size] = _whisper(_size, 51865, _d, _h, _l)
    WHISPER[f"{_size}.en"] = _whisper(f"{_size}.en", 51864, _d, _h, _l)


@dataclass(frozen=True)
class LlamaSpec:
    """A Llama-architecture decoder (SmolLM2, Llama 3.2, Qwen2-style with `qkv_bias`)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    max_context: int
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    # the token table (and the head) are INT8 blocks of 32 in the file (GGUF Q8_0): without torch, the CPU LM
    # kernel (or onnxruntime's exact INT8 head) keeps them so instead of as an fp32 table
    int8_table: bool = False

    @classmethod
    def from_config(cls, cfg, name: str) -> "LlamaSpec":
        """From our `models.llama.LlamaConfig` (what the HF and GGUF loaders produce)."""
        return cls(name, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.max_position_embeddings,
                   cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias)

    def linear_params(self) -> int:
        """Weights of the per-layer projections (what weight-only quantization packs)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate
        return self.layers * (attn + mlp)

    def bias_params(self) -> int:
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        out = self.hidden if self.out_bias else 0
        mlp = 2 * self.intermediate + self.hidden if self.mlp_bias else 0
        return self.layers * (qkv + out + mlp)

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    def param_count(self) -> int:
        return (self.linear_params() + self.bias_params() + self.norm_params() + self.embedding_params()
                + self.lm_head_params())

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# HF config.json of HuggingFaceTB/SmolLM2-135M(-Instruct) and -360M (tied embeddings, vocab 49152).
SMOLLM2_135M = LlamaSpec("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, True, 8192)
SMOLLM2_360M = LlamaSpec("smollm2-360m", 960, 32, 15, 5, 64, 2560, 49152, True, 8192)
LLM: Dict[str, LlamaSpec] = {s.name: s for s in (SMOLLM2_135M, SMOLLM2_360M)}


@dataclass(frozen=True)
class VisionSpec:
    """A SigLIP-style ViT vision tower (no pooling head: Idefics3 uses the last hidden states)."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    channels: int = 3

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def param_count(self) -> int:
        d = self.hidden
        patch = self.channels * self.patch_size ** 2 * d + d
        block = 4 * (d * d + d) + 2 * d * self.intermediate + self.intermediate + d + 4 * d
        return patch + self.tokens * d + self.layers * block + 2 * d


@dataclass(frozen=True)
class VLMSpec:
    """SmolVLM / Idefics3: vision tower -> pixel shuffle (scale_factor) -> linear connector -> LM."""

    name: str
    vision: VisionSpec
    text: LlamaSpec
    scale_factor: int
    max_tiles: int  # image splitting: up to N x N local tiles + 1 global tile

    @classmethod
    def from_config(cls, cfg, name: str, max_tiles: int = 17) -> "VLMSpec":
        """From our `models.idefics3.Idefics3Config` (SigLIP vision config + LlamaConfig)."""
        v = cfg.vision
        vision = VisionSpec(f"{name}-vision", v.hidden_size, v.num_hidden_layers, v.num_attention_heads,
                            v.intermediate_size, v.image_size, v.patch_size, v.num_channels)
        return cls(name, vision, LlamaSpec.from_config(cfg.text, f"{name}-text"), cfg.scale_factor, max_tiles)

    @property
    def tokens_per_tile(self) -> int:
        return self.vision.tokens // self.scale_factor ** 2

    def connector_params(self) -> int:
        return self.vision.hidden * self.scale_factor ** 2 * self.text.hidden  # bias-free linear

    def param_count(self) -> int:
        return self.vision.param_count() + self.connector_params() + self.text.param_count()


# SigLIP base-patch16-512 vision tower (google/siglip-base-patch16-512; 93M with the pooling head,
# which SmolVLM drops). Derived count without the head: 86.4M.
SIGLIP_B16_512 = VisionSpec("siglip-base-patch16-512", 768, 12, 12, 3072, 512, 16)
# SmolVLM-256M/500M-Instruct: SmolLM2 LMs with 128 extra image/special tokens (vocab 49280) and an
# untied LM head (untied is what makes the published totals come out: 256.5M and 507.5M derived).
# Images: longest edge resized to 4 x 512, split into up to 4 x 4 tiles + 1 global tile (17 x 64 tokens).
_VLM_TEXT_256 = LlamaSpec("smolvlm-256m-text", 576, 30, 9, 3, 64, 1536, 49280, False, 8192)
_VLM_TEXT_500 = LlamaSpec("smolvlm-500m-text", 960, 32, 15, 5, 64, 2560, 49280, False, 8192)
VLM: Dict[str, VLMSpec] = {
    "smolvlm-256m": VLMSpec("smolvlm-256m", SIGLIP_B16_512, _VLM_TEXT_256, 4, 17),
    "smolvlm-500m": VLMSpec("smolvlm-500m", SIGLIP_B16_512, _VLM_TEXT_500, 4, 17),
}


@dataclass(frozen=True)
class VADSpec:
    """Silero VAD: tiny, always on the CPU through onnxruntime."""

    name: str
    params: int
    session_mib: int  # measured onnxruntime session RSS (includes the graph and its arena)

    def param_count(self) -> int:
        return self.params


# 309,633 fp32 parameters (silero-vad 6.2.3 `silero_vad_16k.safetensors` header); loading
# `silero_vad_16k_op15.onnx` in onnxruntime 1.32 adds 17 MiB RSS (measured, docs/devices.md).
SILERO_VAD = VADSpec("silero-vad", 309_633, 17)


# ---------------------------------------------------------------------------------------------
# Specs from real files
# ---------------------------------------------------------------------------------------------
def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ModelFileError(f"{where}: config has no '{key}'")
    return cfg[key]


def llama_spec_from_hf_config(cfg: dict, name: str = "llm", where: str = "config.json") -> LlamaSpec:
    """A LlamaSpec from a Hugging Face config dict, parsed by the LM loader (`weights.hf_lm`)."""
    from edge_mmm.weights.hf_lm import lm_config_from_hf

    return LlamaSpec.from_config(lm_config_from_hf(cfg, where), name)


def vlm_spec_from_hf_config(cfg: dict, name: str = "vlm", where: str = "config.json") -> VLMSpec:
    """A VLMSpec from an Idefics3/SmolVLM config.json, parsed by the VLM loader (`weights.idefics3`)."""
    from edge_mmm.weights.idefics3 import idefics3_config_from_hf

    # processor default: longest edge 4 x tile -> up to 4 x 4 tiles + 1 global
    return VLMSpec.from_config(idefics3_config_from_hf(cfg, where), name, 17)


def whisper_spec_from_hf_config(cfg: dict, name: str = "whisper", where: str = "config.json") -> WhisperSpec:
    """A WhisperSpec from a Hugging Face WhisperConfig dict."""
    return WhisperSpec(
        name, _need(cfg, "num_mel_bins", where), _need(cfg, "max_source_positions", where),
        _need(cfg, "d_model", where), _need(cfg, "encoder_attention_heads", where),
        _need(cfg, "encoder_layers", where), _need(cfg, "vocab_size", where),
        _need(cfg, "max_target_positions", where), _need(cfg, "d_model", where),
        _need(cfg, "decoder_attention_heads", where), _need(cfg, "decoder_layers", where))


def whisper_spec_from_dims(dims: dict, name: str = "whisper") -> WhisperSpec:
    """A WhisperSpec from openai-whisper checkpoint `dims` (ModelDimensions as a dict)."""
    try:
        return WhisperSpec(name=name, **{k: int(dims[k]) for k in WhisperSpec.__dataclass_fields__ if k != "name"})
    except KeyError as exc:
        raise ModelFileError(f"whisper dims: missing '{exc.args[0]}'") from exc


def llama_spec_from_gguf(path, name: Optional[str] = None) -> LlamaSpec:
    """A LlamaSpec from GGUF metadata (path or open `gguf.GGUFReader`), parsed by `weights.gguf_lm`."""
    from gguf import GGUFReader

    from edge_mmm.weights.gguf_lm import gguf_metadata, gguf_summary, gguf_tensor_types, lm_config_from_gguf

    if isinstance(path, GGUFReader):
        meta, names = gguf_metadata(path, path.data.filename), {t.name for t in path.tensors}
        types = {t.name: t.tensor_type.name for t in path.tensors}
        path = Path(str(path.data.filename))
    else:
        path = Path(path)
        meta, names = gguf_summary(path)
        types = gguf_tensor_types(path)
    cfg = lm_config_from_gguf(meta, set(names))
    int8_table = types.get("token_embd.weight") == "Q8_0" and types.get("output.weight", "Q8_0") == "Q8_0"
    return replace(LlamaSpec.from_config(cfg, name or path.stem), int8_table=int8_table)


def spec_from_file(path: Union[str, Path], kind: str):
    """Load a spec of `kind` ('asr', 'vlm', 'llm') from a config.json / model dir / .gguf file."""
    path = Path(path)
    if kind == "llm" and path.suffix == ".gguf":
        return llama_spec_from_gguf(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{cfg_path}: cannot read model config ({exc})") from exc
    where = str(cfg_path)
    name = path.name if path.is_dir() else (path.parent.name if path.name == "config.json" else path.stem)
    if kind == "asr":
        if "dims" in cfg:
            return whisper_spec_from_dims(cfg["dims"], name)
        return whisper_spec_from_hf_config(cfg, name, where)
    if kind == "vlm":
        return vlm_spec_from_hf_config(cfg, name, where)
    if kind == "llm":
        return llama_spec_from_hf_config(cfg, name, where)
    raise InputError(f"unknown model kind '{kind}'")


def resolve_spec(value, kind: str):
    """A spec object, a known name, or a path to a config/GGUF file -> the spec."""
    if value is None or isinstance(value, (WhisperSpec, LlamaSpec, VLMSpec, VADSpec)):
        return value
    table = {"asr": WHISPER, "vlm": VLM, "llm": LLM}[kind]
    key = str(value).lower()
    if key in table:
        return table[key]
    if Path(value).exists():
        return spec_from_file(value, kind)
    raise InputError(f"unknown {kind} model '{value}'; known: {', '.join(table)} (or a path to a config.json"
                     f"{' / .gguf' if kind == 'llm' else ''})")
