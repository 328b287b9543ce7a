"""Export bundles: one self-contained folder per target device, and the loader that runs from it.

Layout (every file listed in `manifest.json` with its sha256 and size):
    manifest.json
    asr/  encoder.onnx, decoder.onnx, whisper_config.json, tokenizer.json      (Whisper)
          CPU profiles, fp32: + decoder_pack.json, decoder_pack.bin (the C decoder's weights)
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
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from edge_mmm.bundle import FORMAT, FORMAT_VERSION, MANIFEST
from edge_mmm.devices.planner import DevicePlan, PlanRequest, check_fits
from edge_mmm.devices.profile import DeviceProfile
from edge_mmm.errors import InputError
from edge_mmm.weights.export_cache import atomic_directory, sha256_file

FORMATS = ("bundle", "triton-server")
QUANTS = ("int4", "int8", "fp16")
# tokenizer + processor files of a SmolVLM / Idefics3 checkpoint (those present are copied)
VLM_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "preprocessor_config.json", "processor_config.json", "chat_template.json",
                  "chat_template.jinja", "generation_config.json")
VLM_INT4_GROUP = 64  # load_idefics3's INT4 group (its INT8 is per channel: planned as group 128, the coarsest)
LM_INT8_GROUP = 32  # MatMulNBits needs a power-of-two block; SmolLM2's K = 576 rules out per-channel

Progress = Callable[[str], None]

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
    triton_backend: str = "onnxruntime"  # triton-server format: onnxruntime_onnx graphs | python (onnxruntime in
    #                                      Python-backend models, for a server with only the Python backend)
    cache_root: Optional[Path] = None  # the ONNX export cache (default ~/.cache/edge-mmm)
    # int8 on a GPU profile: speech to calibrate the Whisper encoder's static INT8 (empty = espeak-ng sentences)
    calibration_audio: List[Path] = field(default_factory=list)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.triton_backend not in ("onnxruntime", "python"):
            raise InputError(f"--triton-backend must be onnxruntime or python, got {self.triton_backend!r}")
        if self.triton_backend != "onnxruntime" and self.format != "triton-server":
            raise InputError("--triton-backend applies to --format triton-server only")
        if self.quant not in QUANTS:
            raise InputError(f"--quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.quant == "fp16":
            raise InputError("--quant fp16 is not available: the LM exporter writes int4/int8 MatMulNBits only "
                             "(on GPU profiles the encoders' fp16 comes from the TensorRT engine build); "
                             "use --quant int4 or int8")
        if self.lm is not None and self.vlm is not None and self.format != "triton-server":
            raise InputError("give either --lm or --vlm (a VLM carries its own LM), not both (a triton-server "
                             "repository may serve both)")
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
    if plan_req.vlm is not None and plan_req.llm is not None:  # a triton-server repository serving both
        return _plan_vlm_and_lm(plan_req, request.device, LM_INT8_GROUP if int8 else 32)
    return check_fits(plan_req, request.device)


def _plan_vlm_and_lm(plan_req: PlanRequest, device: DeviceProfile, lm_group: int) -> DevicePlan:
    """The planner takes one LM per plan: plan the VLM set, then the text LM alone, and sum the two tables
    (the text LM's rows as component `text_lm`, its runtime overhead counted once)."""
    from dataclasses import replace

    from edge_mmm.devices.planner import PlanItem, plan
    from edge_mmm.devices.profile import MIB
    from edge_mmm.errors import DeviceError

    with_vlm = check_fits(replace(plan_req, llm=None), device)
    text = plan(replace(plan_req, asr=None, vlm=None, vad=False, group_size=lm_group), device)
    with_vlm.items += [PlanItem("text_lm", i.part, i.bytes, i.detail) for i in text.items if i.component != "runtime"]
    with_vlm.request["llm"] = text.request.get("llm")
    if not with_vlm.fits:
        raise DeviceError(f"plan does not fit on {device.id}: the VLM set and the text LM need "
                          f"{with_vlm.total_bytes / MIB:,.0f} MiB, {with_vlm.budget_bytes / MIB:,.0f} MiB usable")
    return with_vlm


def _is_gguf(path: Path) -> bool:
    return _lm_file(path).suffix == ".gguf"


def _lm_file(path: Path) -> Path:
    from edge_mmm.weights.gguf_lm import lm_source

    return lm_source(path)


# --------------------------------------------------------------------------------------------- export
def export_bundle(request: ExportRequest, out: Union[str, Path], progress: Optional[Progress] = None) -> ExportResult:
    """Plan (refusing a plan that does not fit), export every model, write the manifest, rename into place."""
    t0 = time.perf_counter()
    out = Path(out)
    say = progress or (lambda step: None)
    say("planning memory")
    plan = plan_export(request)
    _check_replaceable(out)
    with atomic_directory(out, shared=True) as tmp:
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
            from edge_mmm.exporters.triton_server import ServingOptions, write_repository

            say("writing the Triton model repository")
            models = write_repository(stage, models, request.device, tmp,
                                      options=ServingOptions(backend=request.triton_backend))
            shutil.rmtree(stage)
        say("hashing files")
        manifest = _manifest(request, plan, models, engines, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
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
    from edge_mmm.asr.api import export_on_first_use
    from edge_mmm.exporters.onnx_whisper import (DECODER_FILE, ENCODER_FILE, EXPORTER_VERSION, OPSET,
                                                 export_whisper_onnx)
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    dest.mkdir(parents=True)
    precision = "int8" if request.quant == "int8" else "fp32"
    if request.device.kind == "cpu":
        # the onnxruntime graphs (fused encoder attention), shared with load_asr's export cache
        cfg, tok_file, onnx_dir = export_on_first_use(request.asr, request.cache_root, precision)
        for name in (ENCODER_FILE, DECODER_FILE):
            _copy(onnx_dir / name, dest)
        if precision == "fp32":
            # the decoder pack edge-mmm's C kernel runs (runners/cpu_whisper.py): where the kernel builds, the
            # bundle's decoder runs as `load_asr`'s does
            from edge_mmm.runners.cpu_whisper import DECODER_PACK_BIN, DECODER_PACK_JSON

            for name in (DECODER_PACK_JSON, DECODER_PACK_BIN):
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
    from edge_mmm.runners.cpu_lm import PACK_BIN, PACK_JSON
    from edge_mmm.text.backends import (DEFAULT_ACTIVATIONS, IO_FILE, ONNX_FILE, export_on_first_use, lm_io,
                                        load_tokenizer, load_weights)

    dest.mkdir(parents=True)
    tokenizer, source = load_tokenizer(Path(request.lm))
    if request.quant == "int4":
        # the file's own 4-bit blocks (GGUF Q4_x as is), load_lm's default activations (fp32): its cached ONNX,
        # so a bundle answers as `edge-mmm run` on the source model does
        activations = DEFAULT_ACTIVATIONS
        onnx_path, io = export_on_first_use(source, request.cache_root, activations)
        _copy(onnx_path, dest, ONNX_FILE)
        pack = json.loads((onnx_path.parent / PACK_JSON).read_text())
        if pack.get("supported"):  # the CPU kernel's weights: the bundle's LM runs on it where it can be built
            _copy(onnx_path.parent / PACK_JSON, dest, PACK_JSON)
            _copy(onnx_path.parent / PACK_BIN, dest, PACK_BIN)
        weights = "source 4-bit blocks" if source.suffix == ".gguf" else "float (source)"
    else:
        from edge_mmm.quant.quantize import quantize_model
        from edge_mmm.text.api import dequantize_linears

        model = load_weights(source)
        dequantize_linears(model)
        quantize_model(model, bits=8, group_size=LM_INT8_GROUP, symmetric=True)
        export_llama_onnx(model, dest / ONNX_FILE, OnnxLMOptions(accuracy_level=4, head_bits=8))
        io = lm_io(model.config, accuracy_level=4)
        activations = "int8"
        weights = f"int8 g{LM_INT8_GROUP} symmetric (RTN of the dequantized source)"
    (dest / IO_FILE).write_text(json.dumps(io))
    save_text_tokenizer(tokenizer, dest)
    return {"kind": "llama", "source": str(source), "name": _model_name(source), "exporter": EXPORTER_VERSION,
            "opset": OPSET, "precision": request.quant, "weights": weights,
            "activations": activations, "dir": "lm"}


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

    from edge_mmm.exporters.onnx_vision import export_vision, natural_tiles
    from edge_mmm.vision.idefics3 import load_idefics3
    from edge_mmm.vision.processor import Idefics3ImageProcessor
    from edge_mmm.weights.quantized import save_quantized

    root = Path(request.vlm)
    quant = request.quant
    model, files = load_idefics3(root, quantize=quant)
    dest.mkdir(parents=True)
    precision = "int8" if quant == "int8" else "fp32"
    processor = Idefics3ImageProcessor(files.image_processor)  # the checks' tiles go through the model's own
    calibration = None
    if precision == "int8":  # static Q/DQ (TensorRT's input): calibrated on photo-like tiles, then checked
        from edge_mmm.exporters.int8_calibration import vision_calibration_inputs

        size = model.vision.vision_model.config.image_size
        calibration = vision_calibration_inputs(list(natural_tiles(8, size, seed=7)), processor,
                                                model.vision.patch_size)
    with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
        exp = export_vision(model.vision, Path(scratch), precision, check=True, calibration=calibration,
                            normalize=processor.normalize)
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
