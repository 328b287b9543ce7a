"""Exporter versions, part of every export-cache key. Kept apart from the exporters (which import torch and
onnx) so that a warm cache hit, e.g. `load_lm(backend="onnxruntime")`, never imports them."""

ONNX_LM = "onnx-lm-7"  # exporters/onnx_lm.py: bump when the exported graph changes (5: float head [K, N] unpacked;
# 6: the entry also holds the CPU LM kernel's weights, exporters/cpu_lm_pack.py; 7: renamed cpu_lm.*, written for the fp32 mode only)
