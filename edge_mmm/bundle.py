"""Read and verify an edge-mmm bundle (exporters/bundle.py writes one), then load its parts for the runtime.

`open_bundle(path)` checks the manifest's format, the file set and every sha256 before anything loads;
`Bundle.load_asr/load_lm/load_vlm/load_vad` build the run-time objects. TensorRT engines planned in the
manifest are built on first use on the device (`Bundle.build_engines`, the bundle's one door into exporters).
A bundle is untrusted input: every path stays inside it (no absolute paths, `..` or links), files are read
without following links, and every value a loader takes from it is typed and range-checked.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from edge_mmm.errors import EdgeMMMError, InputError, ModelFileError
from edge_mmm.weights.untrusted import check_values, inside, open_nofollow, scan_tree, sha256_stream

FORMAT = "edge-mmm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# what a loader accepts from a bundle (its files are checked against the manifest, but a re-hashed bundle
# can say anything): the model keys, and each config file's keys with their types and ranges
MODEL_KEYS = ("asr", "vad", "lm", "vlm")
MAX_CONTEXT = 1 << 20
MAX_KV_BYTES = 64 << 30
MAX_MANIFEST_BYTES = 16 << 20
_DIM = (int, 1, 1 << 16)
WHISPER_CONFIG_SCHEMA = {"n_mels": (int, 1, 512), "n_audio_ctx": _DIM, "n_audio_state": _DIM,
                         "n_audio_head": (int, 1, 256), "n_audio_layer": (int, 1, 256), "n_vocab": (int, 1, 1 << 22),
                         "n_text_ctx": _DIM, "n_text_state": _DIM, "n_text_head": (int, 1, 256),
                         "n_text_layer": (int, 1, 256)}
LM_IO_SCHEMA = {"num_layers": (int, 1, 1024), "num_kv_heads": (int, 1, 1024), "head_dim": (int, 1, 4096),
                "vocab_size": (int, 1, 1 << 22), "max_position_embeddings": (int, 2, MAX_CONTEXT),
                "accuracy_level": (int, 0, 4)}


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
        return self.manifest["plan"]["request"]["context"]  # range-checked by open_bundle

    def _part(self, key: str) -> Path:
        if key not in self.models:
            have = ", ".join(sorted(self.models)) or "nothing"
            raise ModelFileError(f"bundle {self.path} has no {key} model (it holds: {have})")
        d = inside(self.path, self.models[key]["dir"], f"models.{key}.dir")
        if not d.is_dir():
            raise ModelFileError(f"bundle {self.path}: models.{key}.dir {self.models[key]['dir']!r} is not a folder "
                                 f"of the bundle")
        return d

    @contextmanager
    def _loading(self, key: str):
        """Content that passed the hash check can still be malformed (a hand-edited, re-hashed bundle): any
        failure while building a model from it is a ModelFileError naming the bundle and the part."""
        try:
            yield
        except EdgeMMMError:
            raise
        except Exception as exc:  # noqa: BLE001 - the bundle's bytes are input; a bad one is the user's problem
            raise ModelFileError(f"bundle {self.path}: its {key} model cannot be built from the bundle's files "
                                 f"({exc.__class__.__name__}: {str(exc)[:200]}); re-export it") from exc

    def _json(self, d: Path, name: str, schema, key: str) -> dict:
        f = d / name
        try:
            with open_nofollow(f) as fh:
                values = json.loads(fh.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ModelFileError(f"bundle file {f} is not valid JSON ({exc.__class__.__name__})") from exc
        return check_values(values, schema, f"bundle file {f}")

    def load_asr(self, threads: int = 0, backend: str = "onnxruntime", engine_cache: Optional[Path] = None):
        """The Whisper `ASRModel` from the bundle's graphs: on onnxruntime, or (backend="tensorrt", GPU-profile
        bundles, `trt` extra + a CUDA GPU) on TensorRT engines built from the manifest's engine plan on first
        use and cached in `engine_cache` (default ~/.cache/edge-mmm/engines; the bundle itself stays as
        verified)."""
        from edge_mmm.models.whisper import WhisperConfig

        t0 = time.perf_counter()
        d = self._part("asr")
        with self._loading("asr"):
            cfg = WhisperConfig(**self._json(d, "whisper_config.json", WHISPER_CONFIG_SCHEMA, "asr"))
            return self._asr(d, cfg, threads, backend, engine_cache, t0)

    def _asr(self, d, cfg, threads, backend, engine_cache, t0):
        from edge_mmm.asr.api import ASRModel
        from edge_mmm.asr.backends import OnnxWhisperBackend, tensorrt_backend
        from edge_mmm.asr.tokenizer import WhisperTokenizer

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

        d = self._part("vad")
        with self._loading("vad"):
            return SileroVad(d / "silero_vad.onnx")

    def load_lm(self, context_length: Optional[int] = None, threads: int = 0):
        """The text `LanguageModel`: on edge-mmm's CPU kernel when the bundle carries its weights
        (`cpu_lm.*`, checked against the graph's shapes) and it builds here, else on onnxruntime; context
        defaults to the planned one."""
        from edge_mmm.runners.cpu_lm import PACK_JSON
        from edge_mmm.text.api import LanguageModel
        from edge_mmm.text.backends import IO_FILE, ONNX_FILE, CpuBackend, OrtBackend, cpu_lm
        from edge_mmm.text.tokenizer import TextTokenizer

        t0 = time.perf_counter()
        d = self._part("lm")
        with self._loading("lm"):
            io = self._json(d, IO_FILE, LM_IO_SCHEMA, "lm")
            ctx = min(context_length or self.context, io["max_position_embeddings"])
            kv_bytes = 2 * io["num_layers"] * io["num_kv_heads"] * ctx * io["head_dim"] * 4
            if kv_bytes > MAX_KV_BYTES:
                raise ModelFileError(f"bundle file {d / IO_FILE}: its shapes need a {kv_bytes / 2**30:.0f} GiB KV "
                                     f"cache at context {ctx} (limit {MAX_KV_BYTES / 2**30:.0f} GiB)")
            kernel = cpu_lm(d, None, threads) if (d / PACK_JSON).is_file() else None
            backend = CpuBackend(kernel, io, ctx) if kernel is not None else OrtBackend(d / ONNX_FILE, io, ctx, threads)
            return LanguageModel(backend, TextTokenizer.from_dir(d), time.perf_counter() - t0,
                                 f"{self.path}:{self.models['lm']['name']}")

    def load_vlm(self, context_length: Optional[int] = None, threads: int = 0, cache=None):
        """The `VisionLanguageModel`: vision on onnxruntime, the packed LM on torch."""
        import torch

        t0 = time.perf_counter()
        d = self._part("vlm")
        if threads > 0:
            torch.set_num_threads(threads)
        with self._loading("vlm"):
            return self._vlm(d, context_length, threads, cache, t0)

    def _vlm(self, d, context_length, threads, cache, t0):
        import torch

        from edge_mmm.models.idefics3 import Idefics3ForConditionalGeneration, Idefics3Vision
        from edge_mmm.weights.quantized import load_quantized_llama
        from edge_mmm.vision.api import VisionLanguageModel
        from edge_mmm.vision.backends import OrtVisionEncoder
        from edge_mmm.vision.idefics3 import read_vlm_files

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
        with open_nofollow(mpath) as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ModelFileError(f"{mpath} is over {MAX_MANIFEST_BYTES} bytes; not a bundle manifest")
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
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


def check_manifest_values(manifest: dict, path: Path) -> None:
    """Every value a loader takes from the manifest, typed and in range (ModelFileError naming the key)."""
    mpath = path / MANIFEST
    for key, entry in manifest["models"].items():
        if key not in MODEL_KEYS:
            raise ModelFileError(f"{mpath}: unknown model key models.{key} (known: {', '.join(MODEL_KEYS)})")
        if not isinstance(entry, dict) or not isinstance(entry.get("dir"), str) \
                or not isinstance(entry.get("name"), str):
            raise ModelFileError(f"{mpath}: models.{key} must be an object with string 'dir' and 'name'")
        inside(path, entry["dir"], f"models.{key}.dir")
    request = manifest["plan"].get("request")
    context = request.get("context") if isinstance(request, dict) else None
    if not isinstance(context, int) or isinstance(context, bool) or not 2 <= context <= MAX_CONTEXT:
        raise ModelFileError(f"{mpath}: plan.request.context must be an integer in [2, {MAX_CONTEXT}], "
                             f"got {str(context)[:24]}")
    for rel, meta in manifest["files"].items():
        inside(path, rel, "a file listed in the manifest")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or len(meta["sha256"]) != 64 \
                or not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool) or meta["bytes"] < 0:
            raise ModelFileError(f"bundle {path}: manifest entry for {rel} is malformed")
    engines = manifest.get("engine_build") or []
    if not isinstance(engines, list) or not all(isinstance(e, dict) and isinstance(e.get("onnx"), str)
                                                and isinstance(e.get("kind"), str) for e in engines):
        raise ModelFileError(f"{mpath}: engine_build must be a list of objects with string 'onnx' and 'kind'")
    for e in engines:
        inside(path, e["onnx"], "engine_build[].onnx")


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file present with its size and sha256, and no unlisted file: else ModelFileError naming it."""
    path = Path(path)
    listed = manifest["files"]
    present = set(scan_tree(path)) - {MANIFEST}  # also refuses links, special files, world-writable entries
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
        with open_nofollow(f) as fh:
            digest = sha256_stream(fh)
        if digest != want:
            raise ModelFileError(f"bundle file {f} fails its sha256 check: the bundle is corrupt; re-export it")


def open_bundle(path: Union[str, Path]) -> Bundle:
    """Read and verify a bundle (manifest, file set, every sha256); nothing is built yet."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("layout") != "bundle":
        raise ModelFileError(f"{path} is a {manifest.get('layout')} export, not a bundle: serve it with "
                             f"tritonserver --model-repository {path}")
    check_manifest_values(manifest, path)
    verify_files(path, manifest)
    return Bundle(path, manifest)
