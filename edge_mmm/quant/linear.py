"""`QuantLinear`: an `nn.Linear` replacement holding a PackedWeight; every matmul goes through `quant_matmul`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edge_mmm.errors import InputError
from edge_mmm.kernels import use_triton, w4a16_matmul, w8a16_matmul
from edge_mmm.quant.packed import PackedWeight


def quant_matmul(x: torch.Tensor, packed: PackedWeight, activation_quant: str = "none",
                 q8_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x @ W.T` for a packed `W[N, K]`; `x` is `[..., K]`, the result `[..., N]` in `x.dtype`.

    The single dispatch point for weight-only quantized matmuls. This is the torch reference: it
    dequantizes the weight into a temporary of `N * K` elements of `x.dtype` (freed after the call,
    nothing is cached) and runs a dense matmul. Triton `w4a16_matmul` / `w8a16_matmul` plug in here.
    `activation_quant="q8"` computes as llama.cpp's CPU backend instead (8-bit activation blocks and
    integer dot products, `edge_mmm.quant.ggml_numerics.q8_matmul`, which may be given its cached
    `q8_codes`; CPU only, slow).
    """
    if x.shape[-1] != packed.in_features:
        raise InputError(f"quant_matmul: input has {x.shape[-1]} features, weight expects {packed.in_features}")
    if not x.is_floating_point():
        raise InputError(f"quant_matmul: input must be floating point, got {x.dtype}")
    if activation_quant == "q8":
        from edge_mmm.quant.ggml_numerics import q8_matmul

        return q8_matmul(x, packed, q8_codes)
    if activation_quant != "none":
        raise InputError(f"quant_matmul: activation_quant must be 'none' or 'q8', got {activation_quant!r}")
    if use_triton(x):  # CUDA (or a forced kernel mode): fused-dequant Triton GEMV/GEMM
        op = w4a16_matmul if packed.bits == 4 else w8a16_matmul
        return op(x, packed.qweight, packed.scales, packed.zeros, packed.group_size)
    return F.linear(x, packed.dequantize(x.dtype))


class QuantLinear(nn.Module):
    """Weight-only quantized linear layer: `y = x @ W.T + b` with `W` in the packed layout.

    The packed tensors are registered as buffers (so `.to()` and `state_dict()` carry them);
    memory held = `packed.nbytes` + bias, and each forward allocates one transient dequantized weight.
    `activation_quant` ("none" | "q8") is passed to `quant_matmul` (set by `Llama.set_numerics`).
    """

    activation_quant = "none"

    def __init__(self, packed: PackedWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bits, self.group_size = packed.bits, packed.group_size
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise InputError(f"QuantLinear: bias shape {tuple(bias.shape)} != ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        return cls(packed, bias)

    @property
    def packed(self) -> PackedWeight:
        """The current buffers as a PackedWeight (follows `.to(device)`; validated at construction)."""
        return PackedWeight.trusted(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                            (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float32 weight `[N, K]` (a fresh tensor; for inspection and export)."""
        return self.packed.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = None
        if self.activation_quant == "q8":  # float codes cached once: 4 bytes per weight, this mode only
            if getattr(self, "_q8_codes", None) is None:
                from edge_mmm.quant.ggml_numerics import weight_codes

                self._q8_codes = weight_codes(self.packed)
            codes = self._q8_codes
        y = quant_matmul(x, self.packed, self.activation_quant, codes)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        sym = "sym" if self.zeros is None else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {sym}, bias={self.bias is not None}")
