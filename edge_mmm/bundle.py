"""Read and verify an edge-mmm bundle (exporters/bundle.py writes one), then load its parts for the runtime.

`open_bundle(path)` checks the manifest's format, the file set and every sha256 before anything loads;
`Bundle.load_asr/load_lm/load_vlm/load_vad` build the run-time objects. TensorRT engines planned in the
manifest are built on first use on the device (`Bundle.build_engines`, the bundle's one door into exporters).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.weights.export_cache import sha256_file

FORMAT = "edge-mmm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Bundle:
    """A verified bundle: `load_asr()`, `load_lm()`, `load_vlm()`, `load_vad()` build the runtime objects."""

    path: Path
    manifest: dict = field(repr=False)

    @property
    def models(self) -> dict:
        return self.manifest["models"]

    @property
    def context(self) -> int:
        return int(self.manifest["plan"]["request"]["context"])

    def _part(self, key: str) -> Path:
        if key not in self.models:
            have = ", ".join(sorted(self.models)) or "nothing"
            raise ModelFileError(f"bundle {self.path} has no {key} model (it holds: {have})")
        return self.path / self.models[key]["dir"]

    def load_asr(self, threads: int = 0, backend: str = "onnxruntime", engine_cache: Optional[Path] = None):
        """The Whisper `ASRModel` from the bundle's graphs: on onnxruntime, or (backend="tensorrt", GPU-profile
        bundles, `trt` extra + a CUDA GPU) on TensorRT engines built from the manifest's engine plan on first
        use and cached in `engine_cache` (default ~/.cache/edge-mmm/engines; the bundle itself stays as
        verified)."""
        from edge_mmm.asr.api import ASRModel
        from edge_mmm.asr.backends import OnnxWhisperBackend, tensorrt_backend
        from edge_mmm.asr.tokenizer import WhisperTokenizer
        from edge_mmm.models.whisper import WhisperConfig

        t0 = time.perf_counter()
        d = self._part("asr")
        cfg = WhisperConfig(**json.loads((d / "whisper_config.json").read_text()))
        if backend == "tensorrt":
            engines = self.build_engines(self.models["asr"]["dir"], engine_cache)
            backend = tensorrt_backend(engines["whisper-encoder"], engines["whisper-decoder"], cfg)
        elif backend == "onnxruntime":
            backend = OnnxWhisperBackend(d, cfg, threads)
        else:
            raise InputError(f"a bundle's ASR runs on onnxruntime or tensorrt, not {backend!r}")
        tok = WhisperTokenizer.from_file(d / "tokenizer.json", cfg.n_vocab, cfg.is_multilingual, cfg.num_languages)
        return ASRModel(backend, tok, time.perf_counter() - t0, f"{self.path}:{self.models['asr']['name']}")

    def build_engines(self, part_dir: str, engine_cache: Optional[Path] = None) -> Dict[str, Path]:
        """Build (or reuse from the engine cache) the TensorRT engines planned for one part of the bundle:
        {model kind: engine path}. Needs the `trt` extra and a CUDA GPU (typed errors otherwise)."""
        from edge_mmm.exporters.tensorrt_build import build_plan
        from edge_mmm.weights.export_cache import default_cache_root

        entries = [e for e in self.manifest.get("engine_build") or [] if e["onnx"].startswith(part_dir + "/")]
        if not entries:
            raise InputError(f"bundle {self.path} has no TensorRT engine plan for {part_dir}/ (it was exported for "
                             f"{self.manifest['device'].get('id', '?')}); export for a GPU device profile, e.g. "
                             f"edge-mmm export --device orin-nano-8gb")
        built = build_plan(entries, self.path, Path(engine_cache or default_cache_root() / "engines"))
        return {e["kind"]: built[e["onnx"]].path for e in entries}

    def load_vad(self):
        """Silero VAD (`edge_mmm.audio.vad.SileroVad`) from the bundle."""
        from edge_mmm.audio.vad import SileroVad

        return SileroVad(self._part("vad") / "silero_vad.onnx")

    def load_lm(self, context_length: Optional[int] = None, threads: int = 0):
        """The text `LanguageModel` on onnxruntime; context defaults to the planned one."""
        from edge_mmm.text.api import LanguageModel
        from edge_mmm.text.backends import IO_FILE, ONNX_FILE, OrtBackend
        from edge_mmm.text.tokenizer import TextTokenizer

        t0 = time.perf_counter()
        d = self._part("lm")
        io = json.loads((d / IO_FILE).read_text())
        backend = OrtBackend(d / ONNX_FILE, io, context_length or self.context, threads)
        return LanguageModel(backend, TextTokenizer.from_dir(d), time.perf_counter() - t0,
                             f"{self.path}:{self.models['lm']['name']}")

    def load_vlm(self, context_length: Optional[int] = None, threads: int = 0, cache=None):
        """The `VisionLanguageModel`: vision on onnxruntime, the packed LM on torch."""
        import torch

        from edge_mmm.models.idefics3 import Idefics3ForConditionalGeneration, Idefics3Vision
        from edge_mmm.weights.quantized import load_quantized_llama
        from edge_mmm.vision.api import VisionLanguageModel
        from edge_mmm.vision.backends import OrtVisionEncoder
        from edge_mmm.vision.idefics3 import read_vlm_files

        t0 = time.perf_counter()
        d = self._part("vlm")
        if threads > 0:
            torch.set_num_threads(threads)
        files = read_vlm_files(d, weights=False)
        lm = load_quantized_llama(d / "lm")
        cfg = files.config
        cfg.text = lm.config
        with torch.device("meta"):  # the vision tower runs from vision.onnx; its torch module stays empty
            vision = Idefics3Vision(cfg)
        model = Idefics3ForConditionalGeneration(cfg, vision=vision, lm=lm).eval()
        encoder = OrtVisionEncoder(d / "vision.onnx", patch_size=cfg.vision.patch_size, threads=threads)
        return VisionLanguageModel(model, files, encoder, context_length or self.context, cache,
                                   time.perf_counter() - t0, model_id=f"{self.path}:{self.models['vlm']['name']}")


def read_manifest(path: Path) -> dict:
    """The manifest of a bundle directory, with its format checked."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"bundle {path} does not exist or is not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ModelFileError(f"{path} is not an edge-mmm bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"{mpath} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFileError(f"{mpath}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                             f"not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
                             f"(this edge-mmm reads version {FORMAT_VERSION}); re-export the bundle")
    for key in ("files", "models", "plan"):
        if not isinstance(manifest.get(key), dict):
            raise ModelFileError(f"{mpath}: '{key}' is missing or malformed")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file present with its size and sha256, and no unlisted file: else ModelFileError naming it."""
    path = Path(path)
    listed = manifest["files"]
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    missing = sorted(set(listed) - present)
    if missing:
        raise ModelFileError(f"bundle {path}: file {missing[0]} is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(present - set(listed))
    if extra:
        raise ModelFileError(f"bundle {path}: file {extra[0]} is not in the manifest"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for rel, meta in listed.items():
        f = path / rel
        try:
            size, want = f.stat().st_size, meta["sha256"]
            if size != meta["bytes"]:
                raise ModelFileError(f"bundle file {f} has {size} bytes, the manifest says {meta['bytes']}: "
                                     f"the bundle is corrupt; re-export it")
        except (TypeError, KeyError) as exc:
            raise ModelFileError(f"bundle {path}: manifest entry for {rel} is malformed") from exc
        if sha256_file(f) != want:
            raise ModelFileError(f"bundle file {f} fails its sha256 check: the bundle is corrupt; re-export it")


def open_bundle(path: Union[str, Path]) -> Bundle:
    """Read and verify a bundle (manifest, file set, every sha256); nothing is built yet."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("layout") != "bundle":
        raise ModelFileError(f"{path} is a {manifest.get('layout')} export, not a bundle: serve it with "
                             f"tritonserver --model-repository {path}")
    verify_files(path, manifest)
    return Bundle(path, manifest)
