"""Vision backends: the same `encode(pixel_values, pixel_attention_mask)` on torch or onnxruntime.

Both return LM-space features of the real tiles, flattened to (n_tiles * image_seq_len, text_dim) float32,
and count their encoder runs (`calls`) so the image-embedding cache can be checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from edge_mmm.errors import ModelFileError
from edge_mmm.models.idefics3 import Idefics3Vision, real_tiles


class TorchVisionEncoder:
    """Eager `Idefics3Vision`."""

    name = "torch"

    def __init__(self, vision: Idefics3Vision):
        self.vision = vision.eval()
        self.patch_size = vision.patch_size
        self.calls = 0

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        self.calls += 1
        return self.vision.encode(pixel_values, pixel_attention_mask).float()


class OrtVisionEncoder:
    """An exported vision ONNX file run with onnxruntime (CPU unless `providers` says otherwise)."""

    name = "onnxruntime"

    def __init__(self, path: Path, patch_size: Optional[int] = None, threads: int = 0, providers=None):
        import onnxruntime as ort
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"ONNX vision model {path} is missing")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own non-exported exception types
            raise ModelFileError(f"ONNX vision model {path} cannot be loaded: {exc}") from exc
        from edge_mmm.weights.untrusted import check_onnx_inputs

        check_onnx_inputs(self.session, ["pixel_values", "patch_mask"], path)
        self.path = path
        self.patch_size = patch_size
        self.calls = 0

    def __call__(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"pixel_values": pixel_values.float().numpy(),
                                      "patch_mask": patch_mask.bool().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        if self.patch_size is None:
            raise ModelFileError(f"{self.path}: patch size unknown; pass patch_size")
        self.calls += 1
        pv, mask = real_tiles(pixel_values.float(), pixel_attention_mask, self.patch_size)
        feats = self(pv, mask)
        return feats.reshape(-1, feats.shape[-1])


def tensorrt_encoder(engine: Path, patch_size: int, device: str = "cuda", max_tiles: Optional[int] = None):
    """The `tensorrt` vision backend: an engine built from the vision ONNX (exporters/tensorrt_build.py), same
    `encode` interface. Imported lazily; needs the `trt` extra and a CUDA GPU."""
    from edge_mmm.exporters.tensorrt_runtime import TensorRTVisionEncoder

    return TensorRTVisionEncoder(engine, patch_size, device, max_tiles)
