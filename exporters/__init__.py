"""Exporters: ONNX, TensorRT, bundles (installed as edge_mmm.exporters)."""

import threading

# torch.onnx.export and the warnings filters around it are process-wide state: models loaded on two threads
# at once (the live runtime loads Whisper beside the LM) export one at a time.
TORCH_EXPORT_LOCK = threading.RLock()
