"""Round-to-nearest weight-only quantization into the packed layout, and swapping a model's linears.

- INT4 asymmetric: per group `s = (max - min) / 15`, offset `m = min`, `q = round((w - m) / s)`.
- INT4 symmetric (zero point 8, as GGUF Q4_0): `s = w_absmax_signed / -8`, `q = round(w / s) + 8`,
  so the largest-magnitude weight lands exactly on code 0 and the full -8..7 range is used.
- INT8 symmetric: `s = absmax / 127`, `q = round(w / s)` in -127..127.
K not divisible by the group size is padded (docs/quantization.md): the last column is repeated into
the padding, so the partial group's range is that of its real weights; the padding is never used.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from edge_mmm.errors import InputError
from edge_mmm.quant.linear import QuantLinear
from edge_mmm.quant.packed import SYMMETRIC_INT4_ZERO, PackedWeight, num_groups

GROUP_SIZES = (32, 64, 128)
DEFAULT_SKIP = ("lm_head", "output")


def _check_options(bits: int, group_size: Optional[int], symmetric: bool) -> None:
    if bits not in (4, 8):
        raise InputError(f"quantize: bits must be 4 or 8, got {bits}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise InputError(f"quantize: group_size must be one of {GROUP_SIZES} (or None for per-channel "
                         f"INT8), got {group_size}")
    if group_size is None and bits == 4:
        raise InputError("quantize: INT4 needs a group size (32, 64 or 128)")
    if bits == 8 and not symmetric:
        raise InputError("quantize: INT8 is symmetric only (docs/quantization.md)")


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: Optional[int] = 64, symmetric: bool = False,
                    scale_dtype: torch.dtype = torch.float32) -> PackedWeight:
    """RTN-quantize a float weight `[N, K]`; `group_size=None` means per-channel (INT8 only)."""
    _check_options(bits, group_size, symmetric)
    if w.dim() != 2 or not w.is_floating_point():
        raise InputError(f"quantize: weight must be a 2-D float tensor, got {tuple(w.shape)} {w.dtype}")
    if not torch.isfinite(w).all():
        raise InputError("quantize: weight contains NaN or inf")
    n, k = w.shape
    gs = k if group_size is None else group_size
    g = num_groups(k, gs)
    w32 = w.detach().to(torch.float32)
    if g * gs != k:
        w32 = torch.cat((w32, w32[:, -1:].expand(n, g * gs - k)), dim=1)
    wg = w32.view(n, g, gs)

    if bits == 8:
        scale = wg.abs().amax(-1) / 127
        scale_q = scale.to(scale_dtype).to(torch.float32)
        inv = torch.where(scale_q == 0, 0.0, 1.0 / scale_q)
        q = torch.round(wg * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(n, g * gs)
        return PackedWeight(q, scale.to(scale_dtype), None, 8, gs, (n, k))

    if symmetric:
        idx = wg.abs().argmax(-1, keepdim=True)
        scale = (torch.gather(wg, -1, idx) / -SYMMETRIC_INT4_ZERO).squeeze(-1)
        scale_q = scale.to(scale_dtype).to(torch.float32)  # round with the scale that will be stored
        inv = torch.where(scale_q == 0, 0.0, 1.0 / scale_q)
        q = torch.round(wg * inv.unsqueeze(-1)) + SYMMETRIC_INT4_ZERO
        zeros = None
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = (hi - lo) / 15
        zeros = lo.to(scale_dtype)
        scale_q = scale.to(scale_dtype).to(torch.float32)
        inv = torch.where(scale_q == 0, 0.0, 1.0 / scale_q)
        q = torch.round((wg - zeros.to(torch.float32).unsqueeze(-1)) * inv.unsqueeze(-1))
    q = q.clamp(0, 15).to(torch.uint8).view(n, g * gs)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return PackedWeight(qweight.contiguous(), scale.to(scale_dtype), zeros, 4, gs, (n, k))


def _tied_to_embedding(model: nn.Module) -> set:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantize_model(model: nn.Module, bits: int = 4, group_size: Optional[int] = 64, symmetric: bool = False,
                   include_lm_head: bool = False, skip: Iterable[str] = DEFAULT_SKIP,
                   scale_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap every `nn.Linear` of `model` (in place) for a QuantLinear; returns the model.

    Linears whose last name component is in `skip` (the LM head) or whose weight is shared with an
    `nn.Embedding` (tied head) stay float unless `include_lm_head`; a tied head then gets its own
    quantized copy while the embedding stays float.
    """
    _check_options(bits, group_size, symmetric)
    skip = set(skip)
    embedding_weights = _tied_to_embedding(model)
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            is_head = child_name in skip or id(child.weight) in embedding_weights
            if is_head and not include_lm_head:
                continue
            targets.append((module, child_name, child))
    names = {id(child): name for name, child in model.named_modules()}
    for parent, child_name, child in targets:
        try:
            packed = quantize_weight(child.weight, bits, group_size, symmetric, scale_dtype)
        except InputError as exc:
            raise InputError(f"{exc} (layer {names.get(id(child), child_name)})") from exc
        qlin = QuantLinear.from_packed(packed.to(child.weight.device), child.bias)
        setattr(parent, child_name, qlin)
    return model
