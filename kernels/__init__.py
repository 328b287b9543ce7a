"""Triton kernels and their PyTorch references (installed as edge_mmm.kernels).

Every op checks its inputs, then runs our Triton kernel on CUDA tensors and the reference elsewhere;
`set_kernel_mode("reference")` forces the reference everywhere (see dispatch.py). Triton itself is
imported only when a kernel is first launched.
"""

from edge_mmm.kernels.activations import gelu_tanh, gelu_tanh_reference, swiglu, swiglu_reference
from edge_mmm.kernels.decode_attention import decode_attention, decode_attention_reference
from edge_mmm.kernels.dispatch import get_kernel_mode, kernel_mode, set_kernel_mode, use_triton
from edge_mmm.kernels.flash_attention import flash_attention, flash_attention_reference
from edge_mmm.kernels.log_mel import log_mel, log_mel_reference
from edge_mmm.kernels.preprocess import preprocess_image, preprocess_image_reference
from edge_mmm.kernels.quant_matmul import (MatmulConfig, w4a16_matmul, w4a16_matmul_reference, w8a16_matmul,
                                           w8a16_matmul_reference)
from edge_mmm.kernels.rms_norm import rms_norm, rms_norm_reference
from edge_mmm.kernels.rope import rope, rope_reference

__all__ = [
    "set_kernel_mode", "get_kernel_mode", "kernel_mode", "use_triton",
    "rms_norm", "rms_norm_reference",
    "rope", "rope_reference",
    "flash_attention", "flash_attention_reference", "decode_attention", "decode_attention_reference",
    "w4a16_matmul", "w4a16_matmul_reference", "w8a16_matmul", "w8a16_matmul_reference", "MatmulConfig",
    "swiglu", "swiglu_reference", "gelu_tanh", "gelu_tanh_reference",
    "preprocess_image", "preprocess_image_reference", "log_mel", "log_mel_reference",
]
