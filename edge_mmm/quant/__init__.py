"""Weight-only quantization: the packed layout (docs/quantization.md), GGUF repacking, RTN quantizer,
and `QuantLinear` whose matmul goes through `quant_matmul` (the kernel dispatch point)."""

from edge_mmm.quant.gguf_blocks import SUPPORTED_GGUF_TYPES, from_gguf
from edge_mmm.quant.linear import QuantLinear, quant_matmul
from edge_mmm.quant.packed import PackedWeight
from edge_mmm.quant.quantize import quantize_model, quantize_weight

__all__ = ["PackedWeight", "from_gguf", "SUPPORTED_GGUF_TYPES", "QuantLinear", "quant_matmul",
           "quantize_weight", "quantize_model"]
