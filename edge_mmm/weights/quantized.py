"""Quantized LM checkpoints: the packed layout in safetensors plus the model config, written atomically.

Files in the output directory:
- `model.safetensors`: float tensors under their names; each QuantLinear `P` as `P.qweight`,
  `P.scales`, `P.zeros` (asymmetric INT4 only) and `P.bias` (if any), in docs/quantization.md's layout.
- `config.json`: the `LlamaConfig` fields; `quantization.json`: bits, group size, form, and for every
  quantized module its logical shape `[N, K]` (needed when K is padded to whole groups).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from edge_mmm.errors import ModelFileError
from edge_mmm.quant.linear import QuantLinear
from edge_mmm.quant.packed import PackedWeight
from edge_mmm.weights.export_cache import atomic_directory

FORMAT = "edge-mmm-packed-v1"
WEIGHTS, CONFIG, QUANT = "model.safetensors", "config.json", "quantization.json"


def save_quantized(model: nn.Module, out_dir: Path, meta: Dict) -> Path:
    """Write `model` (a Llama with QuantLinear layers) to `out_dir`; replaces it atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors: Dict[str, torch.Tensor] = {}
    modules: Dict[str, list] = {}
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            p = module.packed
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = p.qweight, p.scales
            if p.zeros is not None:
                tensors[f"{name}.zeros"] = p.zeros
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach()
            modules[name] = [p.out_features, p.in_features, p.bits, p.group_size]
    for name, param in model.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[0] in modules or id(param) in seen:  # quantized, or tied to one already written
            continue
        seen[id(param)] = name
        tensors[name] = param.detach()
    if hasattr(model, "rotary"):  # non-persistent buffer; may hold GGUF rope_freqs scaling
        tensors["rotary.inv_freq"] = model.rotary.inv_freq.detach()
    with atomic_directory(out_dir, shared=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=1))
        (tmp / QUANT).write_text(json.dumps({"format": FORMAT, **meta, "modules": modules}, indent=1))
    return out_dir


def load_quantized(path: Path) -> Tuple[Dict, Dict[str, object]]:
    """(config dict, state for `build_llama`: float tensors and QuantLinear modules) from `save_quantized`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for f in (WEIGHTS, CONFIG, QUANT):
        if not (path / f).is_file():
            raise ModelFileError(f"{path}: {f} is missing (not an edge-mmm quantized checkpoint)")
    try:
        tensors = load_file(str(path / WEIGHTS))
        quant = json.loads((path / QUANT).read_text())
        config = json.loads((path / CONFIG).read_text())
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelFileError(f"{path}: unreadable quantized checkpoint: {exc}") from exc
    if quant.get("format") != FORMAT:
        raise ModelFileError(f"{path / QUANT}: format {quant.get('format')!r}, expected {FORMAT}")
    state: Dict[str, object] = {}
    for name, (n, k, bits, group_size) in quant["modules"].items():
        try:
            packed = PackedWeight(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales"),
                                  tensors.pop(f"{name}.zeros", None), bits, group_size, (n, k))
        except KeyError as exc:
            raise ModelFileError(f"{path / WEIGHTS}: tensor {exc} of quantized module {name} is missing") from exc
        state[name] = QuantLinear.from_packed(packed, tensors.pop(f"{name}.bias", None))
    state.update(tensors)
    return config, state


def load_quantized_llama(path: Path):
    """The `Llama` module of a checkpoint written by `save_quantized`."""
    from edge_mmm.models.llama import LlamaConfig, RopeScaling, Rotary, build_llama

    config, state = load_quantized(path)
    inv_freq = state.pop("rotary.inv_freq", None)
    try:
        scaling = config.pop("rope_scaling", None)
        cfg = LlamaConfig(**config, rope_scaling=RopeScaling(**scaling) if scaling else None)
    except TypeError as exc:
        raise ModelFileError(f"{Path(path) / CONFIG}: not a valid LlamaConfig: {exc}") from exc
    model = build_llama(cfg, state)
    if inv_freq is not None:
        model.rotary = Rotary(cfg, inv_freq)
    return model
