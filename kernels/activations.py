"""Fused elementwise activations of the MLP blocks: SwiGLU (Llama) and tanh-GELU (SigLIP, Whisper-free).

    swiglu(g, u) = silu(g) * u = g / (1 + exp(-g)) * u
    gelu_tanh(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

Computed in float32, stored in the input dtype. Out of place; non-contiguous inputs are copied first.
"""

from __future__ import annotations

import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels.dispatch import FLOAT_DTYPES, cdiv, check_same_device, check_tensor, jit, use_triton

tl = None  # triton.language, bound by dispatch.jit on first launch

BLOCK = 1024


@jit
def _swiglu_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@jit
def _gelu_tanh_kernel(X, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) * (x + 0.044715 x^3)
    # tanh(t) = 1 - 2 / (exp(2t) + 1); |t| > 15 is +-1 in float32, clamp so exp never overflows
    inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    tl.store(OUT + offs, (0.5 * x * (1.0 + tanh)).to(OUT.dtype.element_ty), mask=mask)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (`gelu_pytorch_tanh`), computed in float32."""
    return torch.nn.functional.gelu(x.float(), approximate="tanh").to(x.dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    op = "swiglu"
    check_tensor(op, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(op, "up", up, dtypes=FLOAT_DTYPES)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise InputError(f"{op}: gate and up must have one shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    check_same_device(op, gate=gate, up=up)
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    g, u = _flat(gate), _flat(up)
    out = torch.empty_like(g)
    if g.numel():
        _swiglu_kernel[(cdiv(g.numel(), BLOCK),)](g, u, out, g.numel(), BLOCK=BLOCK)
    return out.view(gate.shape)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, elementwise."""
    check_tensor("gelu_tanh", "x", x, dtypes=FLOAT_DTYPES)
    if not use_triton(x):
        return gelu_tanh_reference(x)
    flat = _flat(x)
    out = torch.empty_like(flat)
    if flat.numel():
        _gelu_tanh_kernel[(cdiv(flat.numel(), BLOCK),)](flat, out, flat.numel(), BLOCK=BLOCK)
    return out.view(x.shape)
