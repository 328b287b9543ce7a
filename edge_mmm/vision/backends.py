"""Vision backends: the same `encode(pixel_values, pixel_attention_mask)` on torch, onnxruntime or tensorrt.

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
from edge_mmm.runners.ort_session import ort_session


def in_batches(run, pixel_values: torch.Tensor, patch_mask: torch.Tensor, max_tiles: Optional[int]) -> torch.Tensor:
    """`run(pixel_values, patch_mask)` over at most `max_tiles` tiles per call (the device profile's
    vision_batch bounds the encoder's activation memory); features concatenated in tile order."""
    step = max_tiles or pixel_values.shape[0]
    if step >= pixel_values.shape[0]:
        return run(pixel_values, patch_mask)
    return torch.cat([run(pixel_values[i:i + step], patch_mask[i:i + step])
                      for i in range(0, pixel_values.shape[0], step)])


class TorchVisionEncoder:
    """Eager `Idefics3Vision`."""

    name = "torch"

    def __init__(self, vision: Idefics3Vision, max_tiles: Optional[int] = None):
        self.vision = vision.eval()
        self.patch_size = vision.patch_size
        self.max_tiles = max_tiles
        self.calls = 0

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        self.calls += 1
        if self.max_tiles is None:
            return self.vision.encode(pixel_values, pixel_attention_mask).float()
        dtype = next(self.vision.parameters()).dtype
        pv, mask = real_tiles(pixel_values.to(dtype), pixel_attention_mask, self.patch_size)
        feats = in_batches(self.vision, pv, mask, self.max_tiles)
        return feats.reshape(-1, feats.shape[-1]).float()


class OrtVisionEncoder:
    """An exported vision ONNX file run with onnxruntime (CPU unless `providers` says otherwise)."""

    name = "onnxruntime"

    def __init__(self, path: Path, patch_size: Optional[int] = None, threads: int = 0, providers=None,
                 max_tiles: Optional[int] = None):
        path = Path(path)
        # one long run per frame, with Whisper or the LM next: its idle workers must not spin on their cores
        self.session = ort_session(path, "ONNX vision model", threads, providers,
                                   inputs=["pixel_values", "patch_mask"], spin_after_run=False)
        self.path = path
        self.patch_size = patch_size
        self.max_tiles = max_tiles
        self.calls = 0

    def _run(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"pixel_values": pixel_values.float().numpy(),
                                      "patch_mask": patch_mask.bool().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def __call__(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        return in_batches(self._run, pixel_values, patch_mask, self.max_tiles)

    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        if self.patch_size is None:
            raise ModelFileError(f"{self.path}: patch size unknown; pass patch_size")
        self.calls += 1
        pv, mask = real_tiles(pixel_values.float(), pixel_attention_mask, self.patch_size)
        feats = self(pv, mask)
        return feats.reshape(-1, feats.shape[-1])


class TensorRTVisionEncoder:
    """The same interface on an engine built from our vision ONNX (exporters/tensorrt_build.py)."""

    name = "tensorrt"

    def __init__(self, engine: Path, patch_size: int, device: str = "cuda", max_tiles: Optional[int] = None):
        from edge_mmm.runners.tensorrt_engine import TensorRTEngine

        self.engine = TensorRTEngine(engine, device)
        self.path = Path(engine)
        self.patch_size = patch_size
        self.max_tiles = max_tiles  # the profile's vision_batch: larger images run in chunks
        self.calls = 0

    def _run(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        return self.engine({"pixel_values": pixel_values.float(), "patch_mask": patch_mask.bool()})["image_features"]

    def __call__(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        return in_batches(self._run, pixel_values, patch_mask, self.max_tiles).float().cpu()

    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        self.calls += 1
        pv, mask = real_tiles(pixel_values.float(), pixel_attention_mask, self.patch_size)
        feats = self(pv, mask)
        return feats.reshape(-1, feats.shape[-1])


def tensorrt_encoder(engine: Path, patch_size: int, device: str = "cuda", max_tiles: Optional[int] = None):
    """The `tensorrt` vision backend. Needs the `trt` extra and a CUDA GPU (imported on first use)."""
    return TensorRTVisionEncoder(engine, patch_size, device, max_tiles)
