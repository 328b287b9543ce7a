"""Exporters: ONNX, TensorRT, bundles (installed as edge_mmm.exporters)."""
