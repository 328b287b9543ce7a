"""Export bundles: one self-contained folder per target device, and the loader that runs from it.

Layout (every file listed in `manifest.json` with its sha256 and size):
    manifest.json
    asr/  encoder.onnx, decoder.onnx, whisper_config.json, tokenizer.json      (Whisper)
    vad/  silero_vad.onnx                                                       (with ASR, unless --no-vad)
    lm/   model.onnx (MatMulNBits + KV cache), lm_io.json, tokenizer.json, tokenizer_config.json,
          generation_config.json                                                (text LM)
    vlm/  vision.onnx (SigLIP + connector), config.json, tokenizer + processor files,
          lm/model.safetensors + config.json + quantization.json (packed LM)   (VLM)
The memory plan is checked against the device before anything is written; the bundle is built in a temp
directory beside `out` and renamed into place (weights/export_cache.atomic_directory). `open_bundle`
checks the manifest, the file set and every sha256 before any model is built from it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from edge_mmm.devices.planner import DevicePlan, PlanRequest, check_fits
from edge_mmm.devices.profile import DeviceProfile
from edge_mmm.errors import EdgeMMMError, InputError, ModelFileError
from edge_mmm.weights.export_cache import atomic_directory, sha256_file
from edge_mmm.weights.untrusted import check_values, inside, open_nofollow, scan_tree, sha256_stream

FORMAT = "edge-mmm-bundle"
FORMAT_VERSION = 1
FORMATS = ("bundle", "triton-server")
QUANTS = ("int4", "int8", "fp16")
MANIFEST = "manifest.json"
# tokenizer + processor files of a SmolVLM / Idefics3 checkpoint (those present are copied)
VLM_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "preprocessor_config.json", "processor_config.json", "chat_template.json",
                  "chat_template.jinja", "generation_config.json")
VLM_INT4_GROUP = 64  # load_idefics3's INT4 group (its INT8 is per channel: planned as group 128, the coarsest)
LM_INT8_GROUP = 32  # MatMulNBits needs a power-of-two block; SmolLM2's K = 576 rules out per-channel

Progress = Callable[[str], None]

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
class ExportRequest:
    """What to export. Paths are resolved model locations (None = not in the set)."""

    device: DeviceProfile
    asr: Optional[Path] = None
    lm: Optional[Path] = None
    vlm: Optional[Path] = None
    quant: str = "int4"  # LM weights; int8 also quantizes the encoders (CPU: onnxruntime dynamic int8;
    #                      GPU profiles: a calibrated static Q/DQ Whisper encoder for a TensorRT INT8 engine)
    vad: bool = True  # ship Silero VAD with the ASR
    context: Optional[int] = None  # LM context; default the profile's
    format: str = "bundle"
    cache_root: Optional[Path] = None  # the ONNX export cache (default ~/.cache/edge-mmm)
    # int8 on a GPU profile: speech to calibrate the Whisper encoder's static INT8 (empty = espeak-ng sentences)
    calibration_audio: List[Path] = field(default_factory=list)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.quant not in QUANTS:
            raise InputError(f"--quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.quant == "fp16":
            raise InputError("--quant fp16 is not available: the LM exporter writes int4/int8 MatMulNBits only "
                             "(on GPU profiles the encoders' fp16 comes from the TensorRT engine build); "
                             "use --quant int4 or int8")
        if self.lm is not None and self.vlm is not None:
            raise InputError("give either --lm or --vlm (a VLM carries its own LM), not both")
        if self.asr is None and self.lm is None and self.vlm is None:
            raise InputError("empty model set: give at least one of --asr, --lm, --vlm")


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"].values())


# --------------------------------------------------------------------------------------------- plan
def _asr_spec(path: Path):
    from edge_mmm.devices.specs import whisper_spec_from_dims
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    return whisper_spec_from_dims(asdict(load_whisper_checkpoint(path).config), _model_name(path))


def _model_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def plan_export(request: ExportRequest) -> DevicePlan:
    """The memory plan of the request's model set on its device; DeviceError when it does not fit."""
    from edge_mmm.devices.specs import spec_from_file

    request.validate()
    int8 = request.quant == "int8"
    if request.vlm is not None:
        group = 128 if int8 else VLM_INT4_GROUP
    else:
        group = LM_INT8_GROUP if int8 else 32
    gguf = request.lm is not None and not int8 and _is_gguf(request.lm)
    gpu = request.device.kind != "cpu"
    plan_req = PlanRequest(
        asr=_asr_spec(request.asr) if request.asr is not None else None,
        vlm=spec_from_file(request.vlm, "vlm") if request.vlm is not None else None,
        llm=spec_from_file(_lm_file(request.lm), "llm") if request.lm is not None else None,
        vad=request.vad and request.asr is not None, quant=request.quant, group_size=group,
        zeros=not int8, scale_dtype="fp16" if gguf else "fp32", context=request.context,
        encoder_precision="int8" if int8 else ("fp32" if not gpu else None))
    return check_fits(plan_req, request.device)


def _is_gguf(path: Path) -> bool:
    return _lm_file(path).suffix == ".gguf"


def _lm_file(path: Path) -> Path:
    """A GGUF file, a directory holding exactly one, or a HF directory (returned as is)."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


# --------------------------------------------------------------------------------------------- export
def export_bundle(request: ExportRequest, out: Union[str, Path], progress: Optional[Progress] = None) -> ExportResult:
    """Plan (refusing a plan that does not fit), export every model, write the manifest, rename into place."""
    t0 = time.perf_counter()
    out = Path(out)
    say = progress or (lambda step: None)
    say("planning memory")
    plan = plan_export(request)
    _check_replaceable(out)
    with atomic_directory(out) as tmp:
        stage = tmp / ".stage" if request.format == "triton-server" else tmp
        models: Dict[str, dict] = {}
        if request.asr is not None:
            say("exporting Whisper (encoder + decoder)")
            models["asr"] = _export_asr(request, stage / "asr")
            if request.vad:
                models["vad"] = _export_vad(stage / "vad")
        if request.lm is not None:
            say("exporting the LM (MatMulNBits + KV cache)")
            models["lm"] = _export_lm(request, stage / "lm")
        if request.vlm is not None:
            say("exporting the VLM (vision encoder + connector, packed LM)")
            models["vlm"] = _export_vlm(request, stage / "vlm")
        engines = []
        if request.device.kind != "cpu" and request.format == "bundle":
            say("planning TensorRT engines" + (" (calibrating the INT8 Whisper encoder)"
                                               if request.quant == "int8" and "asr" in models else ""))
            engines = _engine_plan(request, models, tmp)
        if request.format == "triton-server":
            from edge_mmm.exporters.triton_server import write_repository

            say("writing the Triton model repository")
            models = write_repository(stage, models, request.device, tmp)
            shutil.rmtree(stage)
        say("hashing files")
        manifest = _manifest(request, plan, models, engines, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is shared like any folder
    return ExportResult(out, manifest, time.perf_counter() - t0)


def _check_replaceable(out: Path) -> None:
    """An existing `out` is replaced only if it is empty or an earlier export (never a random folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputError(f"output {out} exists and is not an edge-mmm bundle; refusing to replace it")
    if (out / MANIFEST).is_file():
        try:
            fmt = json.loads((out / MANIFEST).read_text()).get("format")
        except (OSError, ValueError):
            fmt = None
        if fmt != FORMAT:
            raise InputError(f"output {out} holds a manifest.json that is not an edge-mmm bundle's; "
                             f"refusing to replace it")


def _copy(src: Path, dst_dir: Path, name: Optional[str] = None) -> str:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / (name or src.name)
    shutil.copyfile(src, dst)
    return dst.name


def _export_asr(request: ExportRequest, dest: Path) -> dict:
    from edge_mmm.asr.api import _cached_onnx
    from edge_mmm.exporters.onnx_whisper import (DECODER_FILE, ENCODER_FILE, EXPORTER_VERSION, OPSET,
                                                 export_whisper_onnx)
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    dest.mkdir(parents=True)
    precision = "int8" if request.quant == "int8" else "fp32"
    if request.device.kind == "cpu":
        # the onnxruntime graphs (fused encoder attention), shared with load_asr's export cache
        cfg, tok_file, onnx_dir = _cached_onnx(request.asr, request.cache_root, precision)
        for name in (ENCODER_FILE, DECODER_FILE):
            _copy(onnx_dir / name, dest)
        fused = True
    else:
        # standard ops only: these graphs feed TensorRT (fp32 ONNX; the engine precision is in the manifest)
        ckpt = load_whisper_checkpoint(request.asr)
        cfg, tok_file = ckpt.config, ckpt.tokenizer_file
        export_whisper_onnx(ckpt.build(), dest, check=True, ort_fused_attention=False)
        precision, fused = "fp32", False
    (dest / "whisper_config.json").write_text(json.dumps(asdict(cfg)))
    _copy(tok_file, dest, "tokenizer.json")
    return {"kind": "whisper", "source": str(request.asr), "name": _model_name(request.asr),
            "exporter": EXPORTER_VERSION, "opset": OPSET, "precision": precision, "fused_attention": fused,
            "dir": "asr"}


def _export_vad(dest: Path) -> dict:
    from edge_mmm.audio.vad import default_vad_model

    src = default_vad_model()
    _copy(src, dest, "silero_vad.onnx")
    return {"kind": "silero-vad", "source": str(src), "name": "silero-vad", "precision": "fp32", "dir": "vad"}


def _export_lm(request: ExportRequest, dest: Path) -> dict:
    from edge_mmm.exporters.onnx_lm import EXPORTER_VERSION, OPSET, OnnxLMOptions, export_llama_onnx
    from edge_mmm.text.ort_backend import IO_FILE, ONNX_FILE, ensure_onnx, load_tokenizer, load_weights

    dest.mkdir(parents=True)
    tokenizer, source = load_tokenizer(Path(request.lm))
    if request.quant == "int4":
        # the file's own 4-bit blocks (GGUF Q4_x as is), fp32 activations: load_lm's default ONNX, cached
        onnx_path, io = ensure_onnx(source, request.cache_root, accuracy_level=0)
        _copy(onnx_path, dest, ONNX_FILE)
        weights = "source 4-bit blocks" if source.suffix == ".gguf" else "float (source)"
    else:
        from edge_mmm.quant.quantize import quantize_model
        from edge_mmm.text.api import dequantize_linears

        model = load_weights(source)
        dequantize_linears(model)
        quantize_model(model, bits=8, group_size=LM_INT8_GROUP, symmetric=True)
        export_llama_onnx(model, dest / ONNX_FILE, OnnxLMOptions(accuracy_level=4, head_bits=8))
        cfg = model.config
        io = {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
              "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
              "accuracy_level": 4}
        weights = f"int8 g{LM_INT8_GROUP} symmetric (RTN of the dequantized source)"
    (dest / IO_FILE).write_text(json.dumps(io))
    save_text_tokenizer(tokenizer, dest)
    return {"kind": "llama", "source": str(source), "name": _model_name(source), "exporter": EXPORTER_VERSION,
            "opset": OPSET, "precision": request.quant, "weights": weights,
            "activations": "fp32" if io["accuracy_level"] == 0 else "int8", "dir": "lm"}


def save_text_tokenizer(tokenizer, dest: Path) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) + generation_config.json
    (stop ids): the files `TextTokenizer.from_dir` reads back to the same tokenizer."""
    tokenizer.tokenizer.save(str(dest / "tokenizer.json"))
    tcfg = {f"{k}_token": v for k, v in tokenizer.special_tokens.items()}
    if tokenizer.chat_template is not None:
        tcfg["chat_template"] = tokenizer.chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1, ensure_ascii=False))
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": list(tokenizer.stop_token_ids)}))


def _export_vlm(request: ExportRequest, dest: Path) -> dict:
    import tempfile

    from edge_mmm.exporters.onnx_vision import export_vision
    from edge_mmm.quant.io import save_quantized
    from edge_mmm.weights.idefics3 import load_idefics3

    root = Path(request.vlm)
    quant = request.quant
    model, files = load_idefics3(root, quantize=quant)
    dest.mkdir(parents=True)
    precision = "int8" if quant == "int8" else "fp32"
    with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
        exp = export_vision(model.vision, Path(scratch), precision, check=True)
        _copy(exp.path, dest, "vision.onnx")
    for name in VLM_TEXT_FILES:
        if (root / name).is_file():
            _copy(root / name, dest)
    bits = 4 if quant == "int4" else 8
    save_quantized(model.lm, dest / "lm", {"bits": bits, "group_size": VLM_INT4_GROUP if bits == 4 else None,
                                           "symmetric": bits == 8, "source": str(root)})
    return {"kind": "idefics3", "source": str(root), "name": root.name, "precision": precision,
            "lm_weights": f"int{bits}", "vision_max_abs_err": exp.max_abs_err, "vision_cosine": exp.cosine,
            "dir": "vlm"}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    import edge_mmm

    return {"edge_mmm": edge_mmm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__}


def _engine_plan(request: ExportRequest, models: Dict[str, dict], root: Path) -> List[dict]:
    """GPU profiles: the TensorRT engines the device builds on first run (exporters/tensorrt_build.EngineSpec
    entries, paths relative to the bundle): Whisper encoder + decoder and the vision encoder, optimization
    profiles from the device profile, precision the profile's (fp16), or INT8 for the Whisper encoder with
    --quant int8 (static Q/DQ, calibrated here on real speech; its TensorRT calibration cache ships beside it)."""
    from edge_mmm.exporters.onnx_whisper import DECODER_FILE, ENCODER_FILE
    from edge_mmm.exporters.tensorrt_build import plan_engine

    dev, specs = request.device, []
    if "asr" in models:
        asr = root / models["asr"]["dir"]
        encoder, precision = asr / ENCODER_FILE, None
        if request.quant == "int8":
            encoder, precision = _int8_whisper_encoder(request, asr, models["asr"]), "int8"
        specs.append(plan_engine(encoder, "whisper-encoder", dev, precision))
        specs.append(plan_engine(asr / DECODER_FILE, "whisper-decoder", dev))
    if "vlm" in models:
        specs.append(plan_engine(root / models["vlm"]["dir"] / "vision.onnx", "vision", dev))
    return [spec.to_dict(relative_to=root) for spec in specs]


def _int8_whisper_encoder(request: ExportRequest, asr_dir: Path, entry: dict) -> Path:
    """Static INT8 Q/DQ copy of the Whisper encoder (TensorRT's explicit quantization) + the TensorRT
    calibration cache from the same activation ranges; both recorded in the manifest's asr entry."""
    import tempfile

    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import SENTENCES
    from edge_mmm.exporters.int8_calibration import (WHISPER_ENCODER_EXCLUDE, CalibrationConfig,
                                                     quantize_encoder_static, synthesize_speech_clips,
                                                     whisper_calibration_inputs, write_tensorrt_calibration_cache)
    from edge_mmm.exporters.onnx_whisper import ENCODER_FILE

    cfg = json.loads((asr_dir / "whisper_config.json").read_text())
    if request.calibration_audio:
        clips = [load_audio(p) for p in request.calibration_audio]
    else:
        with tempfile.TemporaryDirectory(prefix="edge-mmm-calib-") as work:
            clips = synthesize_speech_clips(SENTENCES[:8], work)
    out = asr_dir / "encoder_int8.onnx"
    result = quantize_encoder_static(asr_dir / ENCODER_FILE, whisper_calibration_inputs(clips, cfg["n_mels"]), out,
                                     CalibrationConfig(exclude=WHISPER_ENCODER_EXCLUDE))
    cache = write_tensorrt_calibration_cache(result.activation_scales, asr_dir / "encoder_int8.calib",
                                             request.device.tensorrt_version or "10.3")
    entry["int8_encoder"] = {"onnx": out.name, "tensorrt_calibration_cache": Path(cache).name,
                             "calibration_clips": len(clips), "method": result.method}
    return out


def _manifest(request: ExportRequest, plan: DevicePlan, models: Dict[str, dict], engines: List[dict],
              root: Path) -> dict:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": request.format,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(), "quant": request.quant, "models": models,
            "device": request.device.to_dict(), "plan": plan.to_dict(),
            "engine_build": engines, "files": files}


# --------------------------------------------------------------------------------------------- load
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
        """The text `LanguageModel` on onnxruntime; context defaults to the planned one."""
        from edge_mmm.text.api import LanguageModel
        from edge_mmm.text.ort_backend import IO_FILE, ONNX_FILE, OrtBackend
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
            backend = OrtBackend(d / ONNX_FILE, io, ctx, threads)
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
        from edge_mmm.quant.io import load_quantized_llama
        from edge_mmm.vision.api import VisionLanguageModel
        from edge_mmm.vision.backends import OrtVisionEncoder
        from edge_mmm.weights.idefics3 import read_vlm_files

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
