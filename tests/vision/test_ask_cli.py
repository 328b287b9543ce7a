"""`edge-mmm ask` and `edge-mmm pull` through the CLI entry point (in-process `main`, exit codes).

The Hugging Face Hub is unreachable here, so a hand-built cache in huggingface_hub's own layout
(blobs / snapshots / refs, validated with `scan_cache_dir`) stands in for a previous `pull`, with
HF_HUB_OFFLINE on. Bad inputs must exit 2 with one line naming the problem file.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from test_processor import png_header_only  # noqa: E402
from tiny_idefics3 import build_tiny_vlm  # noqa: E402

from edge_mmm.cli import main  # noqa: E402

REPO = "edge-test/tiny-smolvlm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hf_cache(cache: Path, repo_id: str, src: Path, commit: str = COMMIT) -> Path:
    """Put `src`'s files into `cache` exactly as huggingface_hub lays out a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, repo / "blobs" / digest)
            os.symlink(Path("..") / ".." / "blobs" / digest, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from huggingface_hub import scan_cache_dir

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    build_tiny_vlm(model_dir, seed=7)
    cache = root / "hf_cache"
    add_to_hf_cache(cache, REPO, model_dir)
    assert REPO in {r.repo_id for r in scan_cache_dir(cache).repos}
    photo = root / "coffee.jpg"
    Image.fromarray(skdata.coffee()).save(photo)
    return {"root": root, "model": model_dir, "cache": cache, "photo": photo}


@pytest.fixture
def offline_hub(env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(env["cache"]))


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ask_json_by_path(env, capsys):
    code, out, err = _run(capsys, "ask", "--model", str(env["model"]), "--image", str(env["photo"]),
                          "What is in the picture?", "--json", "--max-tokens", "5")
    assert code == 0, err
    obj = json.loads(out)
    assert set(obj) >= {"text", "token_ids", "timings"}
    for key in ("vision_s", "prefill_s", "ttft_s", "decode_tok_s"):
        assert key in obj["timings"]


def test_pull_from_cache_then_ask_by_repo_id(env, capsys, offline_hub):
    code, out, err = _run(capsys, "pull", REPO, "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert "config.json" in obj["files"] and COMMIT in obj["path"]
    code, out, err = _run(capsys, "ask", "--model", REPO, "-i", str(env["photo"]), "Describe.", "--max-tokens", "3")
    assert code == 0, err


def test_pull_offline_missing_repo_is_clear(env, capsys, offline_hub):
    code, out, err = _run(capsys, "pull", "edge-test/not-downloaded")
    assert code == 2
    assert "edge-test/not-downloaded" in err and "not reachable" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "ask", "--model", "edge-test/not-downloaded", "-i", str(env["photo"]), "Hi?")
    assert code == 2 and "edge-mmm pull edge-test/not-downloaded" in err


def test_pull_offline_env_var_subprocess(env, tmp_path):
    """The real environment variables, as a user sets them (HF_HUB_OFFLINE is read at import)."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(env["cache"]))
    ok = subprocess.run([sys.executable, "-m", "edge_mmm.cli", "pull", REPO], env=e, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "edge_mmm.cli", "pull", "nobody/nothing"], env=e,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nobody/nothing" in bad.stderr


@pytest.mark.parametrize("kind", ["text_file", "zero", "huge", "missing"])
def test_bad_images_exit_2_naming_the_file(env, capsys, tmp_path, kind):
    path = {"text_file": tmp_path / "notes.txt", "zero": tmp_path / "zero.png", "huge": tmp_path / "huge.png",
            "missing": tmp_path / "missing.jpg"}[kind]
    if kind == "text_file":
        path.write_text("hello")
    elif kind == "zero":
        png_header_only(path, 0, 0)
    elif kind == "huge":
        png_header_only(path, 20000, 20000)
    code, _, err = _run(capsys, "ask", "--model", str(env["model"]), "--image", str(path), "What?")
    assert code == 2
    assert path.name in err and err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_16bit_images_are_converted(env, capsys, tmp_path, mode):
    arr = skdata.camera()
    img = {"L": Image.fromarray(arr), "RGBA": Image.fromarray(skdata.astronaut()).convert("RGBA"),
           "I;16": Image.fromarray(arr.astype(np.uint16) * 257)}[mode]
    path = tmp_path / "img.png"
    img.save(path)
    code, _, err = _run(capsys, "ask", "--model", str(env["model"]), "--image", str(path), "What?",
                        "--max-tokens", "2")
    assert code == 0, err


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_model_dir_missing_a_file_exits_2(env, capsys, tmp_path, missing):
    dst = tmp_path / "broken"
    shutil.copytree(env["model"], dst)
    (dst / missing).unlink()
    code, _, err = _run(capsys, "ask", "--model", str(dst), "--image", str(env["photo"]), "What?")
    assert code == 2 and missing in err


@pytest.mark.parametrize("damage", ["truncated_weights", "bad_config_json"])
def test_corrupt_model_file_exits_2_naming_it(env, capsys, tmp_path, damage):
    dst = tmp_path / "corrupt"
    shutil.copytree(env["model"], dst)
    name = "model.safetensors" if damage == "truncated_weights" else "config.json"
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "ask", "--model", str(dst), "--image", str(env["photo"]), "What?")
    assert code == 2 and name in err and err.count("\n") == 1


def test_ask_vision_precision_int8_builds_the_int8_export(env, capsys, tmp_path, monkeypatch):
    """--vision-precision int8 picks the onnxruntime encoder and builds its int8 export into the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, out, err = _run(capsys, "ask", "--model", str(env["model"]), "--image", str(env["photo"]), "What?",
                          "--vision-precision", "int8", "--json", "--max-tokens", "2")
    assert code == 0, err
    assert json.loads(out)["timings"]["vision_s"] > 0
    built = list((tmp_path / "edge-mmm" / "vision-onnx").glob("*/vision_int8_dynamic.onnx"))
    assert len(built) == 1 and not list((tmp_path / "edge-mmm" / "vision-onnx").glob("*/vision_fp32.onnx"))


def test_ask_json_says_which_precision_auto_chose(env, capsys, tmp_path, monkeypatch):
    """The default, --vision-precision auto: on onnxruntime it builds and checks the int8 graph once (the tiny
    model passes) and `--json` says int8 ran; `--backend torch` runs the eager fp32 module and says so."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = ["ask", "--model", str(env["model"]), "--image", str(env["photo"]), "What?", "--json", "--max-tokens", "2"]
    code, out, err = _run(capsys, *base, "--backend", "onnxruntime")
    assert code == 0, err
    assert {k: json.loads(out)[k] for k in ("vision_backend", "vision_precision")} == {
        "vision_backend": "onnxruntime", "vision_precision": "int8"}
    record = list((tmp_path / "edge-mmm" / "vision-onnx").glob("*/vision_auto.json"))
    assert len(record) == 1 and json.loads(record[0].read_text())["precision"] == "int8"
    code, out, err = _run(capsys, *base, "--backend", "torch", "--vision-precision", "auto")
    assert code == 0, err
    assert (json.loads(out)["vision_backend"], json.loads(out)["vision_precision"]) == ("torch", "fp32")


@pytest.mark.parametrize("flags, words", [(["--vision-precision", "int8", "--backend", "torch"], "onnxruntime"),
                                          (["--vision-precision", "fp16"], "fp16")])
def test_ask_vision_precision_refused_before_loading(env, capsys, flags, words):
    code, _, err = _run(capsys, "ask", "--model", str(env["model"]), "--image", str(env["photo"]), "What?", *flags)
    assert code == 2 and "precision" in err and words in err and err.count("\n") == 1, err


def test_vision_precision_in_help(capsys):
    for cmd in ("ask", "run"):
        code, out, _ = _run(capsys, cmd, "--help")
        assert code == 0 and "--vision-precision" in out and "int8" in out and "auto" in out


def test_ask_vlm_lm_backend_onnxruntime_gives_the_torch_answer(env, capsys, tmp_path, monkeypatch):
    """The VLM's LM on onnxruntime (the CPU profile's default, or --vlm-lm-backend): exported once into the cache,
    the same greedy tokens as --vlm-lm-backend torch (the profile's int4 weights both ways); an unknown backend
    exits 2 with one line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = ["ask", "--model", str(env["model"]), "--image", str(env["photo"]), "What is it?", "--json",
            "--max-tokens", "8"]
    code, out, err = _run(capsys, *base, "--vlm-lm-backend", "torch")
    assert code == 0, err
    assert not (tmp_path / "edge-mmm" / "vlm-lm-onnx").exists()
    code, out_ort, err = _run(capsys, *base)  # the cpu profile's choice
    assert code == 0, err
    assert json.loads(out_ort)["token_ids"] == json.loads(out)["token_ids"]
    assert len(list((tmp_path / "edge-mmm" / "vlm-lm-onnx").glob("*/model.onnx"))) == 1
    code, _, err = _run(capsys, *base, "--vlm-lm-backend", "tensorrt")
    assert code == 2 and "--vlm-lm-backend" in err and len(err.strip().splitlines()) == 1
