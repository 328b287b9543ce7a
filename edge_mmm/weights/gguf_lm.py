"""GGUF (llama.cpp) language models -> `LlamaConfig` + state dict for `build_llama`.

The file is memory-mapped by `gguf.GGUFReader`. F32/F16/BF16 tensors are read directly; Q4_0/Q4_1/Q8_0
linears stay packed (`QuantLinear`), the token embedding is dequantized exactly for the lookup.
llama.cpp's converter permutes the Q/K rows of `llama` models for its RoPE; we undo that here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from edge_mmm.errors import ModelFileError
from edge_mmm.models.llama_config import LlamaConfig, llama_param_shapes

# torch is imported by the functions that build weights: reading metadata, the tokenizer and the source
# path (the onnxruntime path, the memory plan) need none of it.

SUPPORTED_ARCHS = ("llama", "qwen2")
# GGUF tensor name suffix -> our module path suffix
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}


def open_gguf(path) -> Any:
    """Memory-map a GGUF file; a truncated or corrupt file is a ModelFileError naming it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise ModelFileError(f"{path} is not a readable GGUF file (truncated or corrupt): {exc}") from exc
    for t in reader.tensors:
        expected = int(t.n_bytes)
        if t.data.nbytes != expected:
            raise ModelFileError(f"{path}: tensor {t.name} has {t.data.nbytes} of {expected} bytes "
                                 f"(file truncated)")
    return reader


def gguf_metadata(reader, path) -> Dict[str, Any]:
    """All key/value metadata as plain Python values (arrays become lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as exc:
            raise ModelFileError(f"{path}: metadata key {key} is corrupt: {exc}") from exc
    return out


def gguf_summary(path) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
    """(metadata, tensor names) of a GGUF file without keeping its reader: parsed once per process and file
    version, so the memory plan and the tokenizer do not parse the same file twice (gguf-py's reader takes
    seconds on a 49k-token vocabulary)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ModelFileError(f"GGUF file not found: {path}") from None
    meta, names, _ = _summary(str(path), st.st_size, st.st_mtime_ns)
    return dict(meta), names


def gguf_tensor_types(path) -> Dict[str, str]:
    """Tensor name -> ggml type name (`Q4_1`, `Q8_0`, `F32`, ...) of a GGUF file, from the same summary."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ModelFileError(f"GGUF file not found: {path}") from None
    return dict(_summary(str(path), st.st_size, st.st_mtime_ns)[2])


SUMMARY_KIND, SUMMARY_VERSION, SUMMARY_FILE = "gguf-summary", "summary-2", "summary.json"


@functools.lru_cache(maxsize=4)
def _summary(path: str, size: int, mtime_ns: int):
    """Parsed once per file content and kept as JSON in the export cache (keyed by the file's sha256, which the
    cache remembers by stat stamp): a cold process reads it in milliseconds instead of re-parsing."""
    import json

    from edge_mmm.weights.export_cache import cached_build, default_cache_root

    parsed = {}

    def parse():
        reader = open_gguf(path)
        parsed["summary"] = (gguf_metadata(reader, Path(path)), tuple(t.name for t in reader.tensors),
                             {t.name: t.tensor_type.name for t in reader.tensors})
        return parsed["summary"]

    def build(tmp: Path) -> None:
        meta, names, types = parse()
        (tmp / SUMMARY_FILE).write_text(json.dumps({"metadata": meta, "tensors": list(names), "types": types},
                                                   allow_nan=True))

    try:
        entry = cached_build(default_cache_root(), SUMMARY_KIND, Path(path), SUMMARY_VERSION, build, [SUMMARY_FILE])
        if "summary" in parsed:
            return parsed["summary"]
        data = json.loads((entry / SUMMARY_FILE).read_text())
        return data["metadata"], tuple(data["tensors"]), dict(data["types"])
    except ModelFileError:
        raise
    except (OSError, TypeError, ValueError, KeyError):  # a read-only cache, a value JSON cannot hold
        return parsed.get("summary") or parse()


def lm_config_from_gguf(meta: Dict[str, Any], tensor_names) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key, default=None):
        full = f"{arch}.{key}"
        if full not in meta:
            if default is None:
                raise ModelFileError(f"GGUF metadata key {full} is missing")
            return default
        return meta[full]

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        max_position_embeddings=int(get("context_length", 2048)),
    )


def _unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head)`: rows (pair-interleaved per head) back to HF's halves order."""
    shape = a.shape
    return a.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensor(t, name: str, path: Path, n_head: int = 0):
    """One GGUF tensor -> float torch tensor, or a QuantLinear for a packed 2-D weight."""
    import gguf
    import torch

    from edge_mmm.quant.gguf_blocks import SUPPORTED_GGUF_TYPES, from_gguf
    from edge_mmm.quant.linear import QuantLinear

    qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists [ne0, ne1]; ours is [N, K]
    data = t.data
    if n_head:  # rows are independent in every block format, so un-permuting raw rows is exact
        data = _unpermute_rows(np.asarray(data).reshape(shape[0], -1), n_head)
    if qtype == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))
    if qtype == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16).reshape(shape)).float()
    if qtype == gguf.GGMLQuantizationType.BF16:
        raw = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(raw.view(np.float32).reshape(shape))
    if qtype not in SUPPORTED_GGUF_TYPES:
        raise ModelFileError(f"{path}: tensor {name} has quantization type {qtype.name}, which is not "
                             f"supported (supported: F32, F16, BF16, "
                             f"{', '.join(q.name for q in SUPPORTED_GGUF_TYPES)})")
    if len(shape) != 2:
        raise ModelFileError(f"{path}: quantized tensor {name} is not 2-D: {shape}")
    return QuantLinear.from_packed(from_gguf(np.asarray(data), qtype, shape))


def _finite(value) -> bool:
    """No NaN/inf in a float tensor, or in a packed weight's block scales and offsets (its codes are integers)."""
    import torch

    from edge_mmm.weights.finite import all_finite

    if isinstance(value, torch.Tensor):
        return all_finite(value)
    packed = value.packed
    return all_finite(packed.scales) and (packed.zeros is None or all_finite(packed.zeros))


def release_heap() -> None:
    """Collect garbage and hand freed heap memory back to the OS (`malloc_trim(0)` on glibc; no-op elsewhere).

    The GGUF reader's ~160 MiB of small metadata objects (a 49k-token vocabulary and its merges) and the
    transients of dequantization are freed after loading, but glibc keeps the pages in its arenas; the
    process RSS would stay ~150-450 MiB above what the model holds (docs/devices.md)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)


def load_gguf_lm(path) -> Tuple[LlamaConfig, Dict[str, object], Dict[str, Any]]:
    """Read a GGUF LM: (config, state dict for `build_llama`, metadata incl. tokenizer keys).

    The reader is dropped as soon as the metadata is converted (before any weight is built), every
    weight is copied out of the memory map, and the freed heap is returned to the OS at the end."""
    import torch

    path = Path(path)
    reader = open_gguf(path)
    meta = gguf_metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    del reader  # its field objects are most of the load-time heap; the tensors keep only the memory map
    gc.collect()
    cfg = lm_config_from_gguf(meta, tensors)
    permute = meta.get("general.architecture") == "llama"
    state: Dict[str, object] = {}
    for gname, t in tensors.items():
        if gname.startswith("blk."):
            _, idx, rest = gname.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise ModelFileError(f"{path}: unexpected tensor {gname}")
            ours = f"layers.{idx}.{_LAYER_NAMES[rest]}"
        elif gname in _GLOBAL_NAMES:
            ours = _GLOBAL_NAMES[gname]
        elif gname == "rope_freqs.weight":
            state["rope_freq_factors"] = torch.from_numpy(np.array(t.data, dtype=np.float32))
            continue
        else:
            raise ModelFileError(f"{path}: unexpected tensor {gname}")
        n_head = 0
        if permute and rest_is(gname, "attn_q"):
            n_head = cfg.num_heads
        elif permute and rest_is(gname, "attn_k"):
            n_head = cfg.num_kv_heads
        try:
            value = _tensor(t, gname, path, n_head)
        except (ValueError, TypeError, IndexError, OverflowError) as exc:  # shape/type fields that do not fit
            raise ModelFileError(f"{path}: tensor {gname} is malformed ({exc.__class__.__name__}: "
                                 f"{str(exc)[:120]})") from exc
        except ModelFileError as exc:  # the block repacker's checks do not know the file
            raise ModelFileError(f"{path}: tensor {gname}: {exc}") from exc
        if not _finite(value):
            raise ModelFileError(f"{path}: tensor {gname} holds NaN or infinite values (a corrupt file)")
        if ours == "embed_tokens.weight" and not isinstance(value, torch.Tensor):
            value = value.weight  # exact dequantization; the tied lm_head shares it
        state[ours] = value
    _check_shapes(cfg, state, path)
    for name in [n for n, v in state.items() if isinstance(v, torch.nn.Module)]:
        module_name = name.rsplit(".", 1)[0]
        module = state.pop(name)
        bias = state.pop(module_name + ".bias", None)
        if bias is not None:
            module = type(module).from_packed(module.packed, bias)
        state[module_name] = module
    del tensors  # the last references to the memory map: its pages leave the RSS
    release_heap()
    return cfg, state, meta


def rest_is(gguf_name: str, kind: str) -> bool:
    return gguf_name.endswith(f".{kind}.weight") or gguf_name.endswith(f".{kind}.bias")


def _check_shapes(cfg: LlamaConfig, state: Dict[str, object], path: Path) -> None:
    import torch

    expected = llama_param_shapes(cfg)
    for name, shape in expected.items():
        if name not in state:
            raise ModelFileError(f"{path}: tensor for {name} is missing")
        v = state[name]
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else (v.out_features, v.in_features)
        if got != shape:
            raise ModelFileError(f"{path}: tensor {name} has shape {got}, but the metadata implies {shape}")


def lm_source(path) -> Path:
    """The file or directory an LM loads from: a .gguf file, the one .gguf inside a directory without a
    config.json, or a Hugging Face directory (config.json + safetensors) as is."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelFileError(f"{path}: expected config.json + safetensors or exactly one .gguf file, "
                                 f"found {len(ggufs)} .gguf files")
        return ggufs[0]
    return path
