"""edge-mmm: an edge multimodal assistant (Whisper + a small quantized VLM), on-device.

Entry points are imported lazily so `import edge_mmm` stays light and works without optional extras.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_asr": ("edge_mmm.asr.api", "load_asr"),
    "load_lm": ("edge_mmm.text.api", "load_lm"),
    "load_vlm": ("edge_mmm.vision.api", "load_vlm"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edge_mmm' has no attribute {name!r}")
