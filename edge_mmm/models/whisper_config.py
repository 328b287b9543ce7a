"""Whisper's dims and the names of its exported ONNX files and tensors: what the onnxruntime path needs at
run time, without torch (edge_mmm.models.whisper re-exports all of it next to the modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class WhisperConfig:
    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int = 51864
    n_text_ctx: int = 448
    n_text_state: int = 384
    n_text_head: int = 6
    n_text_layer: int = 4

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.n_vocab - 51765 - int(self.is_multilingual)


PRESETS = {
    "tiny": WhisperConfig(80, 1500, 384, 6, 4, 51865, 448, 384, 6, 4),
    "base": WhisperConfig(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6),
    "small": WhisperConfig(80, 1500, 768, 12, 12, 51865, 448, 768, 12, 12),
    "medium": WhisperConfig(80, 1500, 1024, 16, 24, 51865, 448, 1024, 16, 24),
    "large-v3": WhisperConfig(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32),
}


# The exported graphs' file and tensor names: exporters/onnx_whisper.py writes them, the onnxruntime and
# TensorRT backends (edge_mmm.asr.backends) read them.
EXPORTER_VERSION = "whisper-onnx-8"  # bump when the graphs or the files beside them change: invalidates cached exports
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"


def cross_names(n_layer: int):
    """Graph names of the per-layer cross-attention K^T and V tensors."""
    return [f"cross_k_{i}" for i in range(n_layer)], [f"cross_v_{i}" for i in range(n_layer)]


def onnx_files(out_dir) -> dict:
    """{"encoder": path, "decoder": path} of an exported Whisper in `out_dir`."""
    return {"encoder": Path(out_dir) / ENCODER_FILE, "decoder": Path(out_dir) / DECODER_FILE}
