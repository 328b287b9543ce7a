"""Fused RMSNorm with an optional residual add: `h = x + residual; y = h / rms(h) * weight`.

    y_i = h_i / sqrt(mean_j(h_j^2) + eps) * w_i

The sum `h` is rounded to the input dtype before it is normalized and returned as the new residual,
as the Hugging Face Llama decoder layer does (`hidden = residual + hidden` in bf16/fp16, then norm).
The statistics and the product are computed in float32; the output has the input dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels.dispatch import FLOAT_DTYPES, check_same_device, check_tensor, jit, next_power_of_2, use_triton

tl = None  # triton.language, bound by dispatch.jit on first launch

MAX_HIDDEN = 65536  # one row per program; larger rows would need a looped kernel


@jit
def _rms_norm_kernel(X, R, W, OUT, RES_OUT, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (h * rstd * w).to(OUT.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor] = None):
    """Plain torch RMSNorm(+residual); returns `out`, or `(out, new_residual)` when `residual` is given."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    out = out.to(x.dtype)
    return out if residual is None else (out, h)


def _check(x, weight, residual):
    op = "rms_norm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weight", weight, ndim=(1,), dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise InputError(f"{op}: x's last dimension {tuple(x.shape)[-1:]} must match weight {tuple(weight.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise InputError(f"{op}: hidden size {x.shape[-1]} exceeds the supported {MAX_HIDDEN}")
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=FLOAT_DTYPES)
        if residual.shape != x.shape:
            raise InputError(f"{op}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_same_device(op, x=x, weight=weight, residual=residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: Optional[torch.Tensor] = None
             ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """RMSNorm over the last dim; with `residual`, normalizes `x + residual` and returns `(out, x + residual)`.

    Out of place; any leading shape; non-contiguous inputs are copied to rows first.
    """
    _check(x, weight, residual)
    if not use_triton(x, weight, residual):
        return rms_norm_reference(x, weight, eps, residual)
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    weight = weight.contiguous()
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty_like(out)
    else:
        r2, res_out = x2, out  # unused by the kernel (HAS_RESIDUAL=False)
    rows = x2.shape[0]
    if rows:
        block = next_power_of_2(n)
        num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, res_out, n, float(eps),
                                  x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
                                  HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)
    out = out.view(shape)
    return out if residual is None else (out, res_out.view(shape))
