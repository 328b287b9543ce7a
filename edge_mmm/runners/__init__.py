"""Shared runners under every modality's backends: the onnxruntime session factory and the TensorRT engine runner."""
