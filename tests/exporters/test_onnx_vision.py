"""ONNX export of the vision part (SigLIP + connector) vs eager, on the check tiles (photo-like + random):
FP32 max abs error < 1e-4; FP16 and INT8 errors reported (FP16 < 1e-2, INT8 cosine > 0.9 on the tiny random
model); INT8-DYNAMIC (the CPU int8 of `load_vlm(vision_precision="int8")`) cosine >= 0.999 with int8 weight
matmuls and fp32 attention matmuls; `vision_precision="auto"` (the default) keeps int8 when every photo-like
tile passes, else fp32, decided once per checkpoint; the onnxruntime backend gives the same greedy answer as
torch."""

import json


import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from tiny_idefics3 import build_tiny_vlm  # noqa: E402

from edge_mmm.exporters.int8_calibration import vision_calibration_inputs  # noqa: E402
from edge_mmm.errors import InputError  # noqa: E402
from edge_mmm.exporters.onnx_vision import (FP32_ATOL, INT8_DYNAMIC_MIN_COSINE, activation_matmuls,  # noqa: E402
                                            check_tiles, export_vision, natural_tiles, output_matmuls)
from edge_mmm.vision.processor import Idefics3ImageProcessor  # noqa: E402
from edge_mmm.text.generation import GenerationConfig  # noqa: E402
from edge_mmm.vision.api import load_vlm  # noqa: E402
from edge_mmm.vision.idefics3 import load_idefics3  # noqa: E402
from edge_mmm.vision.processor import load_image  # noqa: E402

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
               for p in ("fp32", "fp16", "int8", "int8-dynamic")}


def test_natural_tiles_are_deterministic_photo_like_and_in_range(exported):
    """The check tiles: the same uint8 pixels for the same seed (other ones for another), spread over the
    0-255 range with a photo's contrast, neighbouring pixels alike (white noise would differ by ~1.1x its
    spread) and, at SigLIP's 512-px tile, the channels' gradients correlated; through the tiny checkpoint's
    processor (mean = std = 0.5) they land in [-1, 1] exactly as through the default SigLIP normalization,
    followed by the random-normal tiles."""
    a = natural_tiles(5, 512)
    assert a.dtype == np.uint8 and a.shape == (5, 512, 512, 3)
    assert np.array_equal(a, natural_tiles(5, 512)) and not np.array_equal(a, natural_tiles(5, 512, seed=1))
    for t in a.astype(np.float64):
        assert t.max() - t.min() > 200 and 20 < t.std() < 100
        assert np.mean(np.abs(np.diff(t, axis=1))) < 0.3 * np.mean(np.abs(t - t.mean()))
        dx = np.diff(t, axis=1).reshape(-1, 3).T
        assert np.corrcoef(dx[0], dx[1])[0, 1] > 0.3
    d, _ = exported
    model, files = load_idefics3(d)
    processor = Idefics3ImageProcessor(files.image_processor)
    pv, mask = check_tiles(model.vision, processor.normalize)
    default, _ = check_tiles(model.vision)
    assert pv.shape[0] == 8 and bool(mask.all()) and torch.equal(pv, default)
    assert float(pv[:5].min()) >= -1.0 and float(pv[:5].max()) <= 1.0 and float(pv[:5].std()) > 0.2


def test_export_fp32_fp16_int8(exported):
    _, ex = exported
    for p, r in ex.items():
        print(f"{p}: max abs err {r.max_abs_err:.3g}, cosine mean {r.cosine:.6f} lowest {r.min_cosine:.6f} "
              f"({r.tiles} tiles)")
    assert all(r.tiles == 8 for r in ex.values())
    assert ex["fp32"].max_abs_err < FP32_ATOL
    assert ex["fp16"].max_abs_err < 1e-2
    assert ex["int8"].cosine > 0.9
    assert ex["int8-dynamic"].cosine >= INT8_DYNAMIC_MIN_COSINE


def test_int8_dynamic_quantizes_weight_matmuls_only(exported):
    """Every weight MatMul of the fp32 graph but the connector's became an int8 one (7-bit reduce_range
    weights, per channel); the attention's activation x activation MatMuls and the connector stayed fp32;
    the static Q/DQ int8 file is a separate file."""
    import onnx
    from onnx import numpy_helper

    _, ex = exported
    fp32 = onnx.load(str(ex["fp32"].path))
    q = onnx.load(str(ex["int8-dynamic"].path))
    assert ex["int8-dynamic"].path.name == "vision_int8_dynamic.onnx" and ex["int8"].path.name == "vision_int8.onnx"
    kept = output_matmuls(fp32)  # the connector projection stays fp32 too
    assert len(kept) == 1 and kept[0] not in activation_matmuls(fp32)
    n_weight = sum(n.op_type == "MatMul" for n in fp32.graph.node) - len(activation_matmuls(fp32)) - len(kept)
    ops = [n.op_type for n in q.graph.node]
    quantized = [n for n in q.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert n_weight > 0 and len(quantized) == n_weight, ops
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops  # not the static Q/DQ recipe
    inits = {i.name: i for i in q.graph.initializer}
    for node in quantized:  # the second operand is a stored int8 weight, never an activation
        assert node.input[1] in inits, f"{node.name} quantizes an activation (attention) operand"
        w = inits[node.input[1]]
        assert w.data_type == onnx.TensorProto.INT8
        assert np.abs(numpy_helper.to_array(w).astype(np.int32)).max() <= 64  # reduce_range: 7 bits
    # the attention matmuls are still float MatMuls on two activations
    float_acts = activation_matmuls(q)
    assert len(float_acts) == len(activation_matmuls(fp32)) > 0
    assert [n.op_type for n in q.graph.node if n.name == kept[0]] == ["MatMul"]


def _padded_tiles(vision, n=2, seed=3):
    """Random tiles whose last patch rows and columns are padding (patch_mask False), as the processor makes
    for an image that does not fill its tile."""
    s, p = vision.vision_model.config.image_size, vision.patch_size
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(n, 3, s, s, generator=g)
    mask = torch.ones(n, s // p, s // p, dtype=torch.bool)
    mask[0, -1:, :] = False
    mask[1, :, -2:] = False
    return pv, mask


def test_fused_attention_matches_eager_with_padded_patches(exported, tmp_path):
    """fused_attention: every attention core is one com.microsoft::MultiHeadAttention (no Softmax, no
    activation x activation MatMul left) with the patch mask as its key-padding mask; fp32 stays within
    FP32_ATOL of eager on tiles with padding patches, int8-dynamic within cosine 0.999; the unfused
    intermediate graph is not left behind."""
    import onnx
    import onnxruntime as ort

    d, _ = exported
    model, _ = load_idefics3(d)
    vision = model.vision.float().eval()
    layers = vision.vision_model.config.num_hidden_layers
    fp32 = export_vision(vision, tmp_path, "fp32", fused_attention=True)
    int8 = export_vision(vision, tmp_path, "int8-dynamic", fused_attention=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision_fp32.onnx", "vision_int8_dynamic.onnx"]
    pv, mask = _padded_tiles(vision)
    with torch.no_grad():
        ref = vision(pv, mask)
    for ex in (fp32, int8):
        graph = onnx.load(str(ex.path)).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops, ops
        assert activation_matmuls(onnx.load(str(ex.path))) == []
        sess = ort.InferenceSession(str(ex.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"pixel_values": pv.numpy(), "patch_mask": mask.numpy()})[0])
        err = float((got - ref).abs().max())
        cos = float(torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=-1).min())
        print(f"{ex.precision} fused: max abs err {err:.3g}, cosine {cos:.6f}")
        if ex.precision == "fp32":
            assert err < FP32_ATOL
        else:
            assert cos >= INT8_DYNAMIC_MIN_COSINE
    # a padding patch as key changes the answer: the mask is honoured, not dropped
    sess = ort.InferenceSession(str(fp32.path), providers=["CPUExecutionProvider"])
    unmasked = sess.run(None, {"pixel_values": pv.numpy(), "patch_mask": np.ones_like(mask.numpy())})[0]
    assert float(np.abs(unmasked - ref.numpy()).max()) > 100 * FP32_ATOL


def test_an_attention_it_cannot_fuse_keeps_the_unfused_graph(exported, tmp_path, monkeypatch):
    """Another torch's exporter may write attention in a form fuse_attention does not know: the export warns
    and keeps the unfused (checked, correct) graph instead of failing the load."""
    import onnx

    import edge_mmm.exporters.onnx_vision as onnx_vision

    def unknown_form(src, dst, num_heads):
        raise onnx_vision.EdgeMMMError(f"fuse_attention {src}: Softmax x does not read Q K^T")

    monkeypatch.setattr(onnx_vision, "fuse_attention", unknown_form)
    d, _ = exported
    model, _ = load_idefics3(d)
    for precision in ("fp32", "int8-dynamic"):
        with pytest.warns(RuntimeWarning, match="keeps its unfused attention"):
            ex = export_vision(model.vision, tmp_path / precision, precision, fused_attention=True)
        ops = [n.op_type for n in onnx.load(str(ex.path)).graph.node]
        assert "Softmax" in ops and "MultiHeadAttention" not in ops
        assert ex.max_abs_err < FP32_ATOL if precision == "fp32" else ex.cosine >= INT8_DYNAMIC_MIN_COSINE
        left = sorted(p.name for p in (tmp_path / precision).iterdir())  # no intermediate graph left behind
        assert left == (["vision_fp32.onnx"] if precision == "fp32" else ["vision_fp32.onnx", ex.path.name])


def test_fused_attention_is_refused_for_tensorrt_graphs(exported, tmp_path):
    d, _ = exported
    model, _ = load_idefics3(d)
    with pytest.raises(InputError, match="TensorRT"):
        export_vision(model.vision, tmp_path, "fp16", fused_attention=True)


def test_onnxruntime_backend_same_answer(exported):
    d, ex = exported
    cfg = GenerationConfig(max_tokens=12)
    ref = load_vlm(d).generate(MSGS, cfg)
    vlm = load_vlm(d, backend="onnxruntime", vision_onnx=ex["fp32"].path)
    assert vlm.encoder.name == "onnxruntime"
    assert vlm.generate(MSGS, cfg).token_ids == ref.token_ids
    # its idle workers sleep once a frame is encoded (Whisper or the LM runs next; runners/ort_session.py)
    options = vlm.encoder.session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.slow
def test_onnx_export_is_built_once_and_cached(exported, tmp_path):
    d, _ = exported
    vlm = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path)
    again = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path)
    assert again.encoder.path == vlm.encoder.path and vlm.encoder.path.is_file()


def _encode_photo(vlm):
    processed = vlm.processor.process_images([load_image(Image.fromarray(skdata.astronaut()))])
    return vlm.encoder.encode(torch.from_numpy(processed.pixel_values),
                              torch.from_numpy(processed.pixel_attention_mask))


def test_vision_precision_int8_close_to_fp32_and_cached(exported, tmp_path, monkeypatch):
    """load_vlm(vision_precision="int8"): built once into its own export-cache entry (never the fp32 one),
    features of a real photo within cosine 0.999 of the fp32 export's; a second load reuses the entry."""
    import edge_mmm.exporters.onnx_vision as onnx_vision

    d, ex = exported
    int8 = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path, vision_precision="int8")
    path = int8.encoder.path
    assert path.name == "vision_int8_dynamic.onnx" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", path.name]  # no fp32 left over
    fp32 = load_vlm(d, backend="onnxruntime", vision_onnx=ex["fp32"].path)
    a, b = _encode_photo(int8), _encode_photo(fp32)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    assert a.shape == b.shape and cos >= 0.999, cos

    def no_export(*args, **kwargs):
        raise AssertionError("the cached int8 export was rebuilt")

    monkeypatch.setattr(onnx_vision, "export_vision", no_export)
    again = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path, vision_precision="int8")
    assert again.encoder.path == path
    assert torch.equal(_encode_photo(again), a)


def _auto_record(vlm) -> dict:
    return json.loads((vlm.encoder.path.parent / "vision_auto.json").read_text())


def _counting(monkeypatch, module, name: str) -> list:
    """Wrap `module.name` so that each call appends to the returned list."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_vision_precision_auto_picks_int8_once_and_caches_the_choice(exported, tmp_path, monkeypatch):
    """The default, auto, on the tiny model: int8 passes its check (lowest photo-like tile cosine ~0.99999), so
    the int8 graph runs, its features within cosine 0.999 of eager; the choice sits in its own cache entry (the
    graph + a record, nothing else); a second load is a cache hit that neither builds nor checks again."""
    import onnx

    import edge_mmm.exporters.onnx_vision as onnx_vision

    d, _ = exported
    builds = _counting(monkeypatch, onnx_vision, "export_vision_auto")
    checks = _counting(monkeypatch, onnx_vision, "compare_with_eager")
    vlm = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path)
    assert vlm.vision_precision == "int8" and (len(builds), len(checks)) == (1, 1)
    path = vlm.encoder.path
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", "vision_auto.json", "vision_auto.onnx"]
    record = _auto_record(vlm)
    print(f"auto record: {record}")
    assert record["precision"] == "int8" and record["tiles"] == 5
    assert INT8_DYNAMIC_MIN_COSINE <= record["int8_min_cosine"] <= record["int8_mean_cosine"] <= 1.0
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "MultiHeadAttention" in ops
    a, ref = _encode_photo(vlm), _encode_photo(load_vlm(d))
    cos = torch.nn.functional.cosine_similarity(a, ref, dim=-1)
    print(f"auto (int8) vs eager on a photo: cosine mean {float(cos.mean()):.6f}, lowest {float(cos.min()):.6f}")
    assert float(cos.min()) >= INT8_DYNAMIC_MIN_COSINE
    again = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path)
    assert (len(builds), len(checks)) == (1, 1), "the cached choice was rebuilt or re-checked"
    assert again.encoder.path == path and again.vision_precision == "int8"


def test_vision_precision_auto_falls_back_to_fp32(exported, tmp_path, monkeypatch):
    """When the int8 graph misses the check (forced: the bar raised to cosine 1.0, which int8 cannot reach),
    auto runs the fused fp32 graph: the record says fp32 with the int8 cosine measured, the encoder matches
    eager within FP32_ATOL, and no int8 graph is left in the entry."""
    import onnx

    import edge_mmm.exporters.onnx_vision as onnx_vision

    d, _ = exported
    monkeypatch.setattr(onnx_vision, "INT8_DYNAMIC_MIN_COSINE", 1.0)
    vlm = load_vlm(d, backend="onnxruntime", onnx_cache_dir=tmp_path)
    record = _auto_record(vlm)
    print(f"auto record (bar 1.0): {record}")
    assert vlm.vision_precision == "fp32" and record["precision"] == "fp32" and record["tiles"] == 5
    assert 0.999 <= record["int8_min_cosine"] < 1.0 and "missed" in record["reason"]
    assert sorted(p.name for p in vlm.encoder.path.parent.iterdir()) == ["manifest.json", "vision_auto.json",
                                                                          "vision_auto.onnx"]
    ops = {n.op_type for n in onnx.load(str(vlm.encoder.path)).graph.node}
    assert not ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "MultiHeadAttention" in ops
    err = float((_encode_photo(vlm) - _encode_photo(load_vlm(d))).abs().max())
    print(f"auto (fp32) vs eager on a photo: max abs err {err:.3g}")
    assert err < FP32_ATOL


def test_vision_precision_auto_elsewhere(exported):
    """auto on the torch backend is the eager fp32 module; with a given ONNX file, that file as it is."""
    d, ex = exported
    torch_vlm = load_vlm(d)
    assert torch_vlm.encoder.name == "torch" and torch_vlm.vision_precision == "fp32"
    given = load_vlm(d, backend="onnxruntime", vision_onnx=ex["fp32"].path)
    assert given.encoder.path == ex["fp32"].path and given.vision_precision is None


@pytest.mark.parametrize("kwargs", [dict(backend="onnxruntime", vision_precision="fp16"),
                                    dict(backend="onnxruntime", vision_precision="int4"),
                                    dict(backend="torch", vision_precision="int8"),
                                    dict(backend="onnxruntime", vision_precision="int8", vision_onnx="x.onnx"),
                                    dict(backend="onnxruntime", vision_precision="fp32", vision_onnx="x.onnx")])
def test_vision_precision_bad_values_are_input_errors(exported, kwargs):
    d, _ = exported
    with pytest.raises(InputError, match="precision"):
        load_vlm(d, **kwargs)
