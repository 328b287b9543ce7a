"""The onnxruntime speech path runs without torch: `edge-mmm transcribe` and `load_asr(...).transcribe` in a
fresh process never import it (a warm export cache; a cache miss exports with torch, by design).
Importing torch costs ~1.9 s of a cold process on a 2-core x86 (docs/speech.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, tiny_en_dir):
    """An XDG cache root whose edge-mmm export cache already holds tiny.en (built here, with torch)."""
    from edge_mmm.asr.api import load_asr

    root = tmp_path_factory.mktemp("xdg")
    load_asr(tiny_en_dir, backend="onnxruntime", cache_dir=root / "edge-mmm", threads=2)
    return root


def _run(code: str, root) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_transcribe_does_not_import_torch(warm_cache, tiny_en_dir, speech_clips):
    path, text, _ = speech_clips[0]
    code = (
        "import io, json, sys, contextlib\n"
        "from edge_mmm.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    rc = main(['transcribe', {str(path)!r}, '--model', {str(tiny_en_dir)!r}, '--json', '--threads', '2'])\n"
        "print(json.dumps({'rc': rc, 'out': buf.getvalue(), 'torch': 'torch' in sys.modules,\n"
        "                  'kernels': 'edge_mmm.kernels' in sys.modules, 'pydantic': 'pydantic' in sys.modules}))\n")
    res = _run(code, warm_cache)
    assert res["rc"] == 0
    said = json.loads(res["out"].strip().splitlines()[-1])["text"].lower()
    assert "dog" in said or "fox" in said
    assert not res["torch"], "the onnxruntime CLI path imported torch"
    assert not res["kernels"]
    # typer 0.29 coerces every parameter through pydantic (+0.15-0.3 s a cold command): pyproject keeps < 0.29
    assert not res["pydantic"], "the CLI imported pydantic (typer >= 0.29?)"


def test_load_asr_transcribe_does_not_import_torch(warm_cache, tiny_en_dir, speech_clips):
    path, _, _ = speech_clips[1]
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from edge_mmm.asr.api import load_asr, TranscribeOptions\n"
        f"asr = load_asr({str(tiny_en_dir)!r}, backend='onnxruntime', threads=2,\n"
        f"               cache_dir=Path({str(warm_cache)!r}) / 'edge-mmm')\n"
        f"t = asr.transcribe({str(path)!r}, TranscribeOptions(beam_size=2))\n"
        "print(json.dumps({'text': t.text, 'torch': 'torch' in sys.modules}))\n")
    res = _run(code, warm_cache)
    assert res["text"].strip()
    assert not res["torch"], "load_asr + transcribe on onnxruntime imported torch"


def test_torch_backend_still_imports_it(warm_cache, tiny_en_dir, speech_clips):
    """The check above can fail: the torch backend in the same harness does import torch."""
    path, _, _ = speech_clips[0]
    code = (
        "import json, sys\n"
        "from edge_mmm.asr.api import load_asr\n"
        f"asr = load_asr({str(tiny_en_dir)!r}, backend='torch', threads=2)\n"
        f"t = asr.transcribe({str(path)!r})\n"
        "print(json.dumps({'text': t.text, 'torch': 'torch' in sys.modules}))\n")
    assert _run(code, warm_cache)["torch"]
