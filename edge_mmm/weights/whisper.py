"""Whisper checkpoints -> (WhisperConfig, openai-whisper-named state dict, tokenizer file).

Formats: CTranslate2 `model.bin` directories (faster-whisper), Hugging Face `model.safetensors` +
`config.json` directories, and openai-whisper `.pt` checkpoints (read with `weights_only=True`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.models.whisper import Whisper, WhisperConfig
from edge_mmm.weights.ct2 import read_ct2_model


@dataclass
class WhisperCheckpoint:
    config: WhisperConfig
    state_dict: Dict[str, torch.Tensor]
    tokenizer_file: Path
    source: Path  # the file whose bytes define the weights (hashed for export caches)
    format: str  # "ct2" | "hf" | "openai"

    def build(self, dtype: torch.dtype = torch.float32) -> Whisper:
        """Instantiate the model and load the weights, checking every name and shape."""
        model = Whisper(self.config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(expected))
        if missing or unexpected:
            raise ModelFileError(f"{self.source}: weights do not match the Whisper architecture "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, tensor in self.state_dict.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ModelFileError(f"{self.source}: tensor {name} has shape {tuple(tensor.shape)}, the config "
                                     f"implies {tuple(expected[name].shape)}")
        model.load_state_dict({k: v.float() for k, v in self.state_dict.items()})
        return model.to(dtype).eval()


@dataclass
class WhisperFiles:
    format: str  # "ct2" | "hf" | "openai"
    location: Path  # the model directory (ct2, hf) or the .pt file (openai)
    source: Path  # the file whose bytes define the weights


def locate_whisper_files(path: Path) -> WhisperFiles:
    """Detect the checkpoint format of `path` (file or directory) without reading the weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        return WhisperFiles("openai", path, path)
    if path.is_file() and path.name == "model.bin":
        path = path.parent
    if path.is_dir():
        if (path / "model.bin").exists():
            return WhisperFiles("ct2", path, path / "model.bin")
        if (path / "model.safetensors").exists():
            return WhisperFiles("hf", path, path / "model.safetensors")
        if (path / "model.safetensors.index.json").exists():
            return WhisperFiles("hf", path, path / "model.safetensors.index.json")
        pts = sorted(path.glob("*.pt"))
        if len(pts) == 1:
            return WhisperFiles("openai", pts[0], pts[0])
        raise ModelFileError(f"{path}: no Whisper weights found (expected model.bin, model.safetensors "
                             f"+ config.json, or one openai-whisper .pt file)")
    raise ModelFileError(f"{path}: not a Whisper model file or directory")


def load_whisper_checkpoint(path: Path) -> WhisperCheckpoint:
    """Detect the format of `path` (file or directory) and load it."""
    files = locate_whisper_files(path)
    loader = {"ct2": _load_ct2, "hf": _load_hf, "openai": _load_openai}[files.format]
    return loader(files.location)


def tokenizer_file_for(files: WhisperFiles) -> Path:
    directory = files.location if files.location.is_dir() else files.location.parent
    return _tokenizer_file(directory, files.source)


def _tokenizer_file(directory: Path, weights: Path) -> Path:
    tok = directory / "tokenizer.json"
    if not tok.exists():
        hint = (" (openai .pt checkpoints carry no tokenizer: put the model's Hugging Face tokenizer.json beside it)"
                if weights.suffix == ".pt" else "")
        raise ModelFileError(f"{directory}: tokenizer.json missing (needed with {weights.name}){hint}")
    return tok


# ------------------------------------------------------------------ CTranslate2
def _load_ct2(directory: Path) -> WhisperCheckpoint:
    source = directory / "model.bin"
    ct2 = read_ct2_model(source)
    if ct2.spec_name and ct2.spec_name != "WhisperSpec":
        raise ModelFileError(f"{source}: a CTranslate2 {ct2.spec_name} model, not a Whisper model")
    v = ct2.variables

    def get(name: str) -> np.ndarray:
        try:
            arr = ct2.get(name)
        except KeyError:
            raise ModelFileError(f"{source}: variable {name} missing") from None
        scale_name = ct2.aliases.get(name, name) + "_scale"
        if arr.dtype == np.int8 and scale_name in v:  # int8-quantized export: q = round(w * scale)
            arr = arr.astype(np.float32) / v[scale_name].astype(np.float32).reshape(-1, *([1] * (arr.ndim - 1)))
        return arr

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(get(name)).astype(np.float32))

    n_enc = _count_layers(v, "encoder/layer_")
    n_dec = _count_layers(v, "decoder/layer_")
    try:
        cfg = WhisperConfig(
            n_mels=v["encoder/conv1/weight"].shape[1], n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=v["encoder/conv1/weight"].shape[0], n_audio_head=int(v["encoder/num_heads"]),
            n_audio_layer=n_enc, n_vocab=ct2.get("decoder/embeddings/weight").shape[0],
            n_text_ctx=v["decoder/position_encodings/encodings"].shape[0],
            n_text_state=ct2.get("decoder/embeddings/weight").shape[1], n_text_head=int(v["decoder/num_heads"]),
            n_text_layer=n_dec)
    except KeyError as exc:
        raise ModelFileError(f"{source}: variable {exc.args[0]} missing") from None
    d = cfg.n_audio_state
    sd: Dict[str, torch.Tensor] = {}
    for name in ("conv1", "conv2"):
        sd[f"encoder.{name}.weight"] = t(f"encoder/{name}/weight")
        sd[f"encoder.{name}.bias"] = t(f"encoder/{name}/bias")
    sd["encoder.positional_embedding"] = t("encoder/position_encodings/encodings")
    sd["encoder.ln_post.weight"], sd["encoder.ln_post.bias"] = t("encoder/layer_norm/gamma"), t("encoder/layer_norm/beta")
    for i in range(n_enc):
        ct, pt = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        sd.update(_ct2_self_attention(t, f"{ct}/self_attention", f"{pt}.attn", f"{pt}.attn_ln", d))
        sd.update(_ct2_ffn(t, f"{ct}/ffn", pt))
    sd["decoder.token_embedding.weight"] = t("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = t("decoder/position_encodings/encodings")
    sd["decoder.ln.weight"], sd["decoder.ln.bias"] = t("decoder/layer_norm/gamma"), t("decoder/layer_norm/beta")
    dt = cfg.n_text_state
    for i in range(n_dec):
        ct, pt = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        sd.update(_ct2_self_attention(t, f"{ct}/self_attention", f"{pt}.attn", f"{pt}.attn_ln", dt))
        a = f"{ct}/attention"
        sd[f"{pt}.cross_attn.query.weight"], sd[f"{pt}.cross_attn.query.bias"] = t(f"{a}/linear_0/weight"), t(f"{a}/linear_0/bias")
        kv_w, kv_b = t(f"{a}/linear_1/weight"), t(f"{a}/linear_1/bias")
        _check_zero_key_bias(kv_b[:dt], f"{a}/linear_1/bias", source)
        sd[f"{pt}.cross_attn.key.weight"] = kv_w[:dt].clone()
        sd[f"{pt}.cross_attn.value.weight"], sd[f"{pt}.cross_attn.value.bias"] = kv_w[dt:].clone(), kv_b[dt:].clone()
        sd[f"{pt}.cross_attn.out.weight"], sd[f"{pt}.cross_attn.out.bias"] = t(f"{a}/linear_2/weight"), t(f"{a}/linear_2/bias")
        sd[f"{pt}.cross_attn_ln.weight"], sd[f"{pt}.cross_attn_ln.bias"] = t(f"{a}/layer_norm/gamma"), t(f"{a}/layer_norm/beta")
        sd.update(_ct2_ffn(t, f"{ct}/ffn", pt))
    return WhisperCheckpoint(cfg, sd, _tokenizer_file(directory, source), source, "ct2")


def _count_layers(variables, prefix: str) -> int:
    ids = {int(m.group(1)) for k in variables if (m := re.match(re.escape(prefix) + r"(\d+)/", k))}
    return max(ids) + 1 if ids else 0


def _ct2_self_attention(t, ct: str, pt: str, ln: str, d: int) -> Dict[str, torch.Tensor]:
    w, b = t(f"{ct}/linear_0/weight"), t(f"{ct}/linear_0/bias")  # fused [q; k; v]
    return {
        f"{pt}.query.weight": w[:d].clone(), f"{pt}.query.bias": b[:d].clone(),
        f"{pt}.key.weight": w[d : 2 * d].clone(),  # Whisper's key has no bias; CT2 stores zeros there
        f"{pt}.value.weight": w[2 * d :].clone(), f"{pt}.value.bias": b[2 * d :].clone(),
        f"{pt}.out.weight": t(f"{ct}/linear_1/weight"), f"{pt}.out.bias": t(f"{ct}/linear_1/bias"),
        f"{ln}.weight": t(f"{ct}/layer_norm/gamma"), f"{ln}.bias": t(f"{ct}/layer_norm/beta"),
    }


def _check_zero_key_bias(bias: torch.Tensor, name: str, source: Path) -> None:
    if bias.abs().max().item() != 0.0:
        raise ModelFileError(f"{source}: {name} has a non-zero key bias, which Whisper does not have")


def _ct2_ffn(t, ct: str, pt: str) -> Dict[str, torch.Tensor]:
    return {
        f"{pt}.mlp.0.weight": t(f"{ct}/linear_0/weight"), f"{pt}.mlp.0.bias": t(f"{ct}/linear_0/bias"),
        f"{pt}.mlp.2.weight": t(f"{ct}/linear_1/weight"), f"{pt}.mlp.2.bias": t(f"{ct}/linear_1/bias"),
        f"{pt}.mlp_ln.weight": t(f"{ct}/layer_norm/gamma"), f"{pt}.mlp_ln.bias": t(f"{ct}/layer_norm/beta"),
    }


# ------------------------------------------------------------------ Hugging Face
_HF_CONFIG_KEYS = {"num_mel_bins": "n_mels", "max_source_positions": "n_audio_ctx", "d_model": "n_audio_state",
                   "encoder_attention_heads": "n_audio_head", "encoder_layers": "n_audio_layer",
                   "vocab_size": "n_vocab", "max_target_positions": "n_text_ctx",
                   "decoder_attention_heads": "n_text_head", "decoder_layers": "n_text_layer"}


def _load_hf(directory: Path) -> WhisperCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = directory / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{directory}: config.json missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if raw.get("model_type") != "whisper":
        raise ModelFileError(f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'whisper'")
    try:
        kw = {ours: int(raw[theirs]) for theirs, ours in _HF_CONFIG_KEYS.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{cfg_path}: field {exc.args[0] if exc.args else ''} missing or not an integer") from None
    kw["n_text_state"] = kw["n_audio_state"]
    cfg = WhisperConfig(**kw)
    files = [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if not files[0].exists() and index.exists():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    hf: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"{f}: cannot read safetensors ({exc})") from exc
    hf = {k[len("model."):] if k.startswith("model.") else k: v for k, v in hf.items()}
    sd: Dict[str, torch.Tensor] = {}
    try:
        for side, n in (("encoder", cfg.n_audio_layer), ("decoder", cfg.n_text_layer)):
            for i in range(n):
                src, dst = f"{side}.layers.{i}", f"{side}.blocks.{i}"
                attns = [("self_attn", "attn")] + ([("encoder_attn", "cross_attn")] if side == "decoder" else [])
                for theirs, ours in attns:
                    for p, o in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
                        sd[f"{dst}.{ours}.{o}.weight"] = hf[f"{src}.{theirs}.{p}.weight"]
                        if o != "key":
                            sd[f"{dst}.{ours}.{o}.bias"] = hf[f"{src}.{theirs}.{p}.bias"]
                    for wb in ("weight", "bias"):
                        sd[f"{dst}.{ours}_ln.{wb}"] = hf[f"{src}.{theirs}_layer_norm.{wb}"]
                for wb in ("weight", "bias"):
                    sd[f"{dst}.mlp.0.{wb}"] = hf[f"{src}.fc1.{wb}"]
                    sd[f"{dst}.mlp.2.{wb}"] = hf[f"{src}.fc2.{wb}"]
                    sd[f"{dst}.mlp_ln.{wb}"] = hf[f"{src}.final_layer_norm.{wb}"]
        for wb in ("weight", "bias"):
            sd[f"encoder.conv1.{wb}"] = hf[f"encoder.conv1.{wb}"]
            sd[f"encoder.conv2.{wb}"] = hf[f"encoder.conv2.{wb}"]
            sd[f"encoder.ln_post.{wb}"] = hf[f"encoder.layer_norm.{wb}"]
            sd[f"decoder.ln.{wb}"] = hf[f"decoder.layer_norm.{wb}"]
        sd["encoder.positional_embedding"] = hf["encoder.embed_positions.weight"]
        sd["decoder.positional_embedding"] = hf["decoder.embed_positions.weight"]
        sd["decoder.token_embedding.weight"] = hf["decoder.embed_tokens.weight"]
    except KeyError as exc:
        raise ModelFileError(f"{directory}: tensor {exc.args[0]} missing from the safetensors weights") from None
    return WhisperCheckpoint(cfg, sd, _tokenizer_file(directory, files[0]), files[0], "hf")


# ------------------------------------------------------------------ openai-whisper
def _load_openai(path: Path) -> WhisperCheckpoint:
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError) on bad files
        raise ModelFileError(f"{path}: cannot read openai-whisper checkpoint ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ModelFileError(f"{path}: not an openai-whisper checkpoint (needs 'dims' and 'model_state_dict')")
    names = {f.name for f in fields(WhisperConfig)}
    try:
        cfg = WhisperConfig(**{k: int(v) for k, v in ckpt["dims"].items() if k in names})
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: bad 'dims' ({exc})") from exc
    sd = {k: v for k, v in ckpt["model_state_dict"].items() if k != "alignment_heads"}
    return WhisperCheckpoint(cfg, sd, _tokenizer_file(path.parent, path), path, "openai")


def save_openai_checkpoint(ckpt: WhisperCheckpoint, path: Path) -> None:
    """Write an openai-whisper style `.pt` (dims + model_state_dict), atomically."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"dims": asdict(ckpt.config), "model_state_dict": ckpt.state_dict}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
