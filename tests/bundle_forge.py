"""Hand-written export bundles (manifest + hashed files), as someone forging one would write them: for the
bundle security tests and the manifest fuzzer. No export or model needed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edge_mmm.bundle import FORMAT, FORMAT_VERSION, MANIFEST

WHISPER_TINY = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
                "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4}


def write_bundle(root: Path, files: dict, models: dict, context=512) -> Path:
    """A bundle with `files` ({rel: bytes}) listed and hashed in its manifest, as `export` would write it."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    rehash(root, {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": "bundle", "models": models,
                  "plan": {"request": {"context": context}}, "device": {"id": "cpu-x86"}, "files": {}})
    return root


def rehash(root: Path, manifest: dict = None) -> None:
    """List every file under `root` (following links, as a forger's script would) with its sha256."""
    manifest = manifest or json.loads((root / MANIFEST).read_text())
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            data = p.read_bytes()
            files[p.relative_to(root).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["files"] = files
    (root / MANIFEST).write_text(json.dumps(manifest))


def asr_files(config=None) -> dict:
    return {"asr/whisper_config.json": json.dumps(config or WHISPER_TINY).encode(),
            "asr/tokenizer.json": b"{}", "asr/encoder.onnx": b"onnx", "asr/decoder.onnx": b"onnx"}


ASR = {"asr": {"kind": "whisper", "name": "tiny.en", "dir": "asr"}}
