"""Whisper checkpoints -> (WhisperConfig, openai-whisper-named state dict, tokenizer file).

Formats: CTranslate2 `model.bin` directories (faster-whisper), Hugging Face `model.safetensors` +
`config.json` directories, and openai-whisper `.pt` checkpoints (read with `weights_only=True`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.models.whisper import Whisper, WhisperConfig
from edge_mmm.weights.finite import all_finite
from edge_mmm.weights.ct2 import read_ct2_model
from edge_mmm.weights.whisper_files import (WhisperFiles, _tokenizer_file, ct2_config, hf_config,  # noqa: F401
                                           locate_whisper_files, read_whisper_config, tokenizer_file_for)


@dataclass
class WhisperCheckpoint:
    config: WhisperConfig
    state_dict: Dict[str, torch.Tensor]
    tokenizer_file: Path
    source: Path  # the file whose bytes define the weights (hashed for export caches)
    format: str  # "ct2" | "hf" | "openai"

    def build(self, dtype: torch.dtype = torch.float32) -> Whisper:
        """Instantiate the model and load the weights, checking every name and shape. The model is built on
        the meta device and takes the checkpoint's tensors (no random init: ~0.15 s for tiny, seconds for large)."""
        with torch.device("meta"):
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
            if not all_finite(tensor):
                raise ModelFileError(f"{self.source}: tensor {name} holds NaN or infinite values (a corrupt file)")
        model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in self.state_dict.items()}, assign=True)
        return model.to(dtype).eval()


def load_whisper_checkpoint(path: Path) -> WhisperCheckpoint:
    """Detect the format of `path` (file or directory) and load it."""
    files = locate_whisper_files(path)
    loader = {"ct2": _load_ct2, "hf": _load_hf, "openai": _load_openai}[files.format]
    return loader(files.location)


# ------------------------------------------------------------------ CTranslate2
def _load_ct2(directory: Path) -> WhisperCheckpoint:
    source = directory / "model.bin"
    ct2 = read_ct2_model(source)
    cfg = ct2_config(ct2, source)  # checks the spec name first
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

    n_enc, n_dec = cfg.n_audio_layer, cfg.n_text_layer
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
def _load_hf(directory: Path) -> WhisperCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = hf_config(directory)
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
