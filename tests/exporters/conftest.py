"""Fixtures shared by the exporter tests."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest


@dataclass
class TinyVision:
    model: Any  # Idefics3ForConditionalGeneration (random weights)
    files: Any  # VLMFiles
    root: Path
    photos: Callable  # (skimage photo names) -> real tiles of those photos, as calibration inputs


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory) -> TinyVision:
    """A tiny random Idefics3 checkpoint (tests/tiny_idefics3.py), loaded, with real photo tiles."""
    pytest.importorskip("transformers")
    skdata = pytest.importorskip("skimage.data")
    from tiny_idefics3 import build_tiny_vlm

    from edge_mmm.exporters.int8_calibration import vision_calibration_inputs
    from edge_mmm.vision.idefics3 import load_idefics3
    from edge_mmm.vision.processor import Idefics3ImageProcessor

    d = tmp_path_factory.mktemp("tiny_vlm")
    build_tiny_vlm(d, seed=5)
    model, files = load_idefics3(d)
    proc = Idefics3ImageProcessor(files.image_processor)

    def photos(names):
        return vision_calibration_inputs([getattr(skdata, n)() for n in names], proc, model.vision.patch_size)

    return TinyVision(model, files, d, photos)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A tiny random Idefics3 checkpoint directory (seed 3), for the export and serving tests."""
    pytest.importorskip("transformers")
    from tiny_idefics3 import build_tiny_vlm

    d = tmp_path_factory.mktemp("tiny_vlm_dir")
    build_tiny_vlm(d, seed=3)
    return d
