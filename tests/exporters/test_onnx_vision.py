"""ONNX export of the vision part (SigLIP + connector) vs eager: FP32 max abs error < 1e-4; FP16 and INT8
errors reported (FP16 < 1e-2, INT8 cosine > 0.9 on the tiny random model); the onnxruntime backend gives the
same greedy answer as torch."""


import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from tiny_idefics3 import build_tiny_vlm  # noqa: E402

from edge_mmm.exporters.int8_calibration import vision_calibration_inputs  # noqa: E402
from edge_mmm.exporters.onnx_vision import FP32_ATOL, export_vision  # noqa: E402
from edge_mmm.vision.processor import Idefics3ImageProcessor  # noqa: E402
from edge_mmm.text.generation import GenerationConfig  # noqa: E402
from edge_mmm.vision.api import load_vlm  # noqa: E402
from edge_mmm.vision.idefics3 import load_idefics3  # noqa: E402

MSGS = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(skdata.rocket())},
                                     {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_vlm_onnx")
    build_tiny_vlm(d, seed=5)
    model, files = load_idefics3(d)
    out = d / "onnx"
    calib = vision_calibration_inputs([skdata.astronaut(), skdata.coffee(), skdata.chelsea()],
                                      Idefics3ImageProcessor(files.image_processor), model.vision.patch_size)
    return d, {p: export_vision(model.vision, out, p, calibration=calib if p == "int8" else None)
               for p in ("fp32", "fp16", "int8")}


def test_export_fp32_fp16_int8(exported):
    _, ex = exported
    for p, r in ex.items():
        print(f"{p}: max abs err {r.max_abs_err:.3g}, cosine {r.cosine:.6f}")
    assert ex["fp32"].max_abs_err < FP32_ATOL
    assert ex["fp16"].max_abs_err < 1e-2
    assert ex["int8"].cosine > 0.9


def test_onnxruntime_backend_same_answer(exported):
    d, ex = exported
    cfg = GenerationConfig(max_tokens=12)
    ref = load_vlm(d).generate(MSGS, cfg)
    vlm = load_vlm(d, backend="onnxruntime", vision_onnx=ex["fp32"].path)
    assert vlm.encoder.name == "onnxruntime"
    assert vlm.generate(MSGS, cfg).token_ids == ref.token_ids


@pytest.mark.slow
def test_onnx_export_is_built_once_and_cached(exported, tmp_path):
    d, _ = exported
    vlm = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path)
    again = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path)
    assert again.encoder.path == vlm.encoder.path and vlm.encoder.path.is_file()
