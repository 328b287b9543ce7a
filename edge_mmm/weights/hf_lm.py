"""Hugging Face Llama/Qwen2/Mistral checkpoints (config.json + safetensors, sharded or not) -> our config + state.

Safetensors are opened lazily (`safe_open`); keys lose the `model.` prefix (`prefix` is configurable so a
VLM can load its text model, e.g. `model.text_model.`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.models.llama import LlamaConfig, RopeScaling, llama_param_shapes
from edge_mmm.weights.finite import all_finite

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def lm_config_from_hf(cfg: Mapping[str, Any], where: str = "config.json") -> LlamaConfig:
    """Map a transformers config dict (v4 `rope_scaling` or v5 `rope_parameters`) onto `LlamaConfig`."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFileError(f"{where}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelFileError(f"{where}: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window")):
        raise ModelFileError(f"{where}: sliding-window attention is not supported")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", None):
        raise ModelFileError(f"{where}: rope type {rope_type!r} is not supported (default, llama3)")
    try:
        heads = int(cfg["num_attention_heads"])
        llama_bias = bool(cfg.get("attention_bias", False))
        return LlamaConfig(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or 0),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=scaling, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or llama_bias,
            attention_out_bias=model_type != "qwen2" and llama_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{where}: missing or invalid field {exc}") from exc


def safetensors_files(path: Path) -> List[Path]:
    """The checkpoint's files: the shards named by model.safetensors.index.json, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise ModelFileError(f"{path} has no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.is_file():
            raise ModelFileError(f"safetensors shard {f} is missing")
    return files


def read_safetensors(files: List[Path]) -> Dict[str, torch.Tensor]:
    """Every tensor of every file; a truncated or corrupt file, or one holding NaN/inf weights, is a
    ModelFileError naming it (and the tensor)."""
    from safetensors import safe_open

    out: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                for key in keys:
                    out[key] = st.get_tensor(key)
        except Exception as exc:  # SafetensorError / OSError on a bad header or short file
            raise ModelFileError(f"{f} is not a readable safetensors file (truncated or corrupt): {exc}") from exc
        for key in keys:
            value = out[key]
            if not all_finite(value):
                raise ModelFileError(f"{f}: tensor {key} holds NaN or infinite values (a corrupt file)")
    return out


def hf_state_to_llama(tensors: Mapping[str, torch.Tensor], cfg: LlamaConfig, prefix: str = "model.",
                      where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Rename HF keys to ours and check every expected tensor is present with the config's shape."""
    state = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            state[key[len(prefix):]] = value
        elif key == "lm_head.weight":
            state[key] = value
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = llama_param_shapes(cfg)
    for name, shape in expected.items():
        if name not in state:
            raise ModelFileError(f"{where}: tensor {prefix if name != 'lm_head.weight' else ''}{name} is missing")
        if tuple(state[name].shape) != shape:
            raise ModelFileError(f"{where}: tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"config.json implies {shape}")
    return {k: v for k, v in state.items() if k in expected}


def load_hf_lm(path) -> Tuple[LlamaConfig, Dict[str, torch.Tensor]]:
    """Read a HF model directory: (config, state dict for `build_llama`)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelFileError(f"{path} has no config.json")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{cfg_file} is not valid JSON: {exc}") from exc
    cfg = lm_config_from_hf(raw, str(cfg_file))
    return cfg, hf_state_to_llama(read_safetensors(safetensors_files(path)), cfg, where=str(path))
