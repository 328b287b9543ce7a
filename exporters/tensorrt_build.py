"""TensorRT engine builds from our ONNX files: optimization profiles from the device profile, FP16 / INT8,
a timing cache, and an engine cache keyed by everything that makes an engine valid.

- Optimization profiles: every dynamic input dimension of the ONNX graph is named by our exporters
  (`batch`, `n_tiles`, `new`, `past`, `seq`, `past_seq`); `profile_shapes` maps each name to (min, opt, max)
  from the device profile (vision tiles per call, LM context length and prefill chunk) and the model
  (Whisper's 448-token text context). Static dimensions stay as exported.
- Precision: fp32, fp16 (`BuilderFlag.FP16`), int8. INT8 is explicit quantization when the ONNX carries Q/DQ
  nodes (exporters/int8_calibration.py's static QDQ model: TensorRT takes the scales from the graph), else
  implicit quantization from a calibration cache written by `write_tensorrt_calibration_cache` (read through
  a cache-only IInt8EntropyCalibrator2; TensorRT 10 deprecates implicit quantization but still builds it).
- Engine cache: `<cache>/<onnx stem>-<key16>.engine`, key = sha256 over GPU name, compute capability,
  TensorRT version, ONNX sha256, precision, profile shapes, calibration-cache sha256 and plugin ops. The
  timing cache `<cache>/timing-<gpu>-sm<cc>-trt<version>.cache` is shared by every build on that GPU +
  TensorRT and saved after each build. Files are written atomically (temp file, then rename).

`tensorrt` is imported lazily; without it an explicit build raises MissingExtraError naming the `trt` extra
(bundles carry the plan and build engines on first run on the device). No engine is ever faked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from edge_mmm.errors import DeviceError, InputError, ModelFileError, require

BUILDER_VERSION = "edge-mmm-trt-1"  # bump when build settings change: invalidates cached engines
PRECISIONS = ("fp32", "fp16", "int8")
MODEL_KINDS = ("whisper-encoder", "whisper-decoder", "vision", "lm")
WHISPER_TEXT_CTX = 448  # Whisper's decoder context (all sizes): past + new tokens never exceed it
WHISPER_MAX_GROUP = 5  # beam size / best-of: decoder rows per audio window
WHISPER_MAX_PROMPT = WHISPER_TEXT_CTX // 2  # prompt + start tokens fed in one step (whisper's n_ctx // 2)
TRT_PURPOSE = ("building TensorRT engines here; an exported bundle builds its engines on first run on the "
               "device instead")

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shape of one input in an optimization profile."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self):
        if not len(self.min) == len(self.opt) == len(self.max):
            raise InputError(f"shape range ranks differ: {self.min} / {self.opt} / {self.max}")
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise InputError(f"shape range must satisfy min <= opt <= max per dim: {self.min} {self.opt} {self.max}")

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ShapeRange":
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


def dim_ranges(kind: str, profile) -> Dict[str, Tuple[int, int, int]]:
    """(min, opt, max) of each named dynamic dimension our exporters use, for `kind` on device `profile`."""
    if kind not in MODEL_KINDS:
        raise InputError(f"unknown model kind {kind!r}; one of {', '.join(MODEL_KINDS)}")
    if kind == "whisper-encoder":
        return {"batch": (1, 1, 1)}  # one 30 s window per call (transcribe / streaming encode one at a time)
    if kind == "whisper-decoder":
        # rows = hypotheses of one window; `new`: 1 per step, up to the prompt + start sequence on the first
        # step; `past`: the self-attention cache, bounded by the text context.
        return {"batch": (1, 1, WHISPER_MAX_GROUP), "new": (1, 1, WHISPER_MAX_PROMPT),
                "past": (0, 64, WHISPER_TEXT_CTX - 1)}
    if kind == "vision":
        return {"n_tiles": (1, 1, profile.vision_batch)}
    ctx, chunk = profile.default_context, min(profile.prefill_chunk, profile.default_context)
    # LM: one sequence; `seq` new tokens per call (1 at decode, up to a prefill chunk); `past_seq`: the KV cache
    return {"batch": (1, 1, 1), "seq": (1, 1, chunk), "past_seq": (0, ctx // 2, ctx - 1)}


def value_ranges(kind: str) -> Dict[str, ShapeRange]:
    """Value ranges of inputs TensorRT may treat as shape tensors (scalars that index or size tensors):
    Whisper's decoder `offset` (position of the first new token) is in [0, 447]."""
    if kind == "whisper-decoder":
        return {"offset": ShapeRange((0,), (64,), (WHISPER_TEXT_CTX - 1,))}
    if kind not in MODEL_KINDS:
        raise InputError(f"unknown model kind {kind!r}; one of {', '.join(MODEL_KINDS)}")
    return {}


def onnx_input_dims(onnx_path: Union[str, Path]) -> Dict[str, List[Union[int, str]]]:
    """Graph inputs (initializers excluded) -> dims: int for static, the symbolic name for dynamic."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX file not found")
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        out[inp.name] = dims
    return out


def profile_shapes(onnx_path: Union[str, Path], kind: str, profile) -> Dict[str, ShapeRange]:
    """The optimization profile (input name -> min/opt/max) of `onnx_path` on device `profile`.

    Every dynamic dimension must be one our exporters name; an unnamed one is an InputError (a graph we do
    not know how to bound)."""
    ranges = dim_ranges(kind, profile)
    shapes = {}
    for name, dims in onnx_input_dims(onnx_path).items():
        lo, opt, hi = [], [], []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
                continue
            if d not in ranges:
                raise InputError(f"{onnx_path}: input {name!r} dim {i} is dynamic ({d!r}) but {kind} has no "
                                 f"range for it (known: {', '.join(ranges)})")
            a, b, c = ranges[d]
            lo.append(a), opt.append(b), hi.append(c)
        shapes[name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
    return shapes


# ----------------------------------------------------------------------------------------------------------
# what an engine is built from, and its cache key
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceIdentity:
    """What makes a serialized engine loadable: the GPU model, its compute capability, TensorRT's version."""

    gpu_name: str
    compute_capability: str  # "8.7"
    trt_version: str  # "10.3.0"

    def slug(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        return f"{gpu}-sm{self.compute_capability.replace('.', '')}-trt{self.trt_version}"


def current_device_identity() -> DeviceIdentity:
    """The CUDA GPU this process would build on, and the installed TensorRT (both required)."""
    trt = require("tensorrt", "trt", TRT_PURPOSE)
    import torch

    if not torch.cuda.is_available():
        raise DeviceError("building a TensorRT engine needs a CUDA GPU; none is visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return DeviceIdentity(torch.cuda.get_device_name(), f"{major}.{minor}", trt.__version__)


@dataclass(frozen=True)
class EngineSpec:
    """One engine to build: source ONNX, precision, optimization profile, optional INT8 calibration cache,
    builder workspace, and the plugin ops (domain::op) the graph uses."""

    onnx_path: Path
    kind: str
    precision: str
    shapes: Dict[str, ShapeRange]
    workspace_mib: int = 256
    calibration_cache: Optional[Path] = None
    plugin_ops: Tuple[str, ...] = ()
    values: Dict[str, ShapeRange] = field(default_factory=dict)  # shape-tensor inputs: value ranges

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"engine precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.kind not in MODEL_KINDS:
            raise InputError(f"unknown model kind {self.kind!r}; one of {', '.join(MODEL_KINDS)}")
        if self.workspace_mib < 1:
            raise InputError(f"TensorRT workspace must be at least 1 MiB, got {self.workspace_mib}")

    def to_dict(self, relative_to: Optional[Path] = None) -> dict:
        rel = (lambda p: str(Path(p).relative_to(relative_to))) if relative_to else str  # noqa: E731
        return {"onnx": rel(self.onnx_path), "kind": self.kind, "precision": self.precision,
                "shapes": {k: v.to_dict() for k, v in self.shapes.items()}, "workspace_mib": self.workspace_mib,
                "calibration_cache": rel(self.calibration_cache) if self.calibration_cache else None,
                "plugin_ops": list(self.plugin_ops), "values": {k: v.to_dict() for k, v in self.values.items()}}

    @classmethod
    def from_dict(cls, d: Mapping, base: Optional[Path] = None) -> "EngineSpec":
        where = (lambda p: Path(base) / p) if base else Path  # noqa: E731
        try:
            return cls(where(d["onnx"]), d["kind"], d["precision"],
                       {k: ShapeRange.from_dict(v) for k, v in d["shapes"].items()}, int(d["workspace_mib"]),
                       where(d["calibration_cache"]) if d.get("calibration_cache") else None,
                       tuple(d.get("plugin_ops", ())),
                       {k: ShapeRange.from_dict(v) for k, v in d.get("values", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"bad engine build plan entry {dict(d)!r}: {exc}") from exc


def plan_engine(onnx_path: Union[str, Path], kind: str, profile, precision: Optional[str] = None,
                calibration_cache: Optional[Path] = None) -> EngineSpec:
    """The EngineSpec for one of our ONNX files on a device profile: shapes from the profile, precision the
    profile's activation dtype unless given, workspace from `trt_workspace_mib`, plugin ops found in the graph."""
    from edge_mmm.exporters.tensorrt_plugins import plugin_ops_in

    if profile.trt_workspace_mib <= 0:
        raise DeviceError(f"device profile {profile.id} has no TensorRT (trt_workspace_mib = 0)")
    prec = precision or ("fp16" if profile.activation_dtype in ("fp16", "bf16") else "fp32")
    if prec != "fp32" and not profile.supports(prec):
        raise DeviceError(f"device profile {profile.id} does not support {prec}")
    return EngineSpec(Path(onnx_path), kind, prec, profile_shapes(onnx_path, kind, profile),
                      profile.trt_workspace_mib, Path(calibration_cache) if calibration_cache else None,
                      tuple(plugin_ops_in(onnx_path)), value_ranges(kind))


def sha256_file(path: Path) -> str:
    from edge_mmm.weights.export_cache import sha256_file as _sha

    return _sha(Path(path))


def engine_cache_key(spec: EngineSpec, device: DeviceIdentity, onnx_sha256: Optional[str] = None) -> str:
    """sha256 hex over everything that makes a serialized engine valid for reuse."""
    payload = {"builder": BUILDER_VERSION, "gpu": device.gpu_name, "cc": device.compute_capability,
               "trt": device.trt_version, "onnx_sha256": onnx_sha256 or sha256_file(spec.onnx_path),
               "precision": spec.precision, "kind": spec.kind,
               "shapes": {k: spec.shapes[k].to_dict() for k in sorted(spec.shapes)},
               "workspace_mib": spec.workspace_mib,
               "calibration_sha256": sha256_file(spec.calibration_cache) if spec.calibration_cache else None,
               "plugin_ops": sorted(spec.plugin_ops),
               "values": {k: spec.values[k].to_dict() for k in sorted(spec.values)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_path(cache_dir: Path, spec: EngineSpec, key: str) -> Path:
    return Path(cache_dir) / f"{Path(spec.onnx_path).stem}-{spec.precision}-{key[:16]}.engine"


def timing_cache_path(cache_dir: Path, device: DeviceIdentity) -> Path:
    return Path(cache_dir) / f"timing-{device.slug()}.cache"


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------------------------------------------------
# the build (needs tensorrt + a GPU)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class EngineBuild:
    path: Path
    key: str
    cached: bool  # True: an engine with this key was already there, nothing was built
    build_s: float = 0.0
    log: List[str] = field(default_factory=list)


def _stderr_progress(line: str) -> None:
    sys.stderr.write(line + "\n")


def has_qdq(onnx_path: Union[str, Path]) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _trt_classes(trt):
    """IProgressMonitor / cache-only calibrator subclasses, made once tensorrt is imported."""

    class Progress(trt.IProgressMonitor):
        """Builder progress as lines `phase: step/total` (TensorRT >= 10: BuilderConfig.progress_monitor)."""

        def __init__(self, emit):
            trt.IProgressMonitor.__init__(self)
            self.emit, self.steps = emit, {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            self.emit(f"  {parent_phase + ' / ' if parent_phase else ''}{phase_name}: 0/{num_steps}")

        def step_complete(self, phase_name, step):
            total = self.steps.get(phase_name, 0)
            if total >= 10 and (step + 1) % max(1, total // 4) == 0:
                self.emit(f"  {phase_name}: {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        """Serves a calibration cache and no batches: TensorRT takes every scale from the cache."""

        def __init__(self, cache: bytes):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache = cache

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache):
            return None

    return Progress, CacheCalibrator


def build_engine(spec: EngineSpec, cache_dir: Union[str, Path], *, device: Optional[DeviceIdentity] = None,
                 progress: Callable[[str], None] = _stderr_progress, force: bool = False) -> EngineBuild:
    """Build (or find in `cache_dir`) the engine for `spec`; returns its path and key."""
    trt = require("tensorrt", "trt", TRT_PURPOSE)
    if int(re.findall(r"\d+", trt.__version__)[0]) < 10:
        raise DeviceError(f"TensorRT {trt.__version__} is too old: the builder uses the TensorRT 10 API "
                          "(JetPack 6.1+ ships 10.3); on older JetPacks use the onnxruntime backend")
    device = device or current_device_identity()
    cache_dir = Path(cache_dir)
    key = engine_cache_key(spec, device)
    out = engine_path(cache_dir, spec, key)
    if out.is_file() and not force:
        return EngineBuild(out, key, cached=True)
    if spec.plugin_ops:
        from edge_mmm.exporters.tensorrt_plugins import register_plugins

        register_plugins()
    t0 = time.perf_counter()
    progress(f"building TensorRT engine {out.name} ({spec.precision}, {device.gpu_name} sm{device.compute_capability}, "
             f"TensorRT {device.trt_version}); cached for next time")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelFileError(f"TensorRT cannot parse {spec.onnx_path}: {'; '.join(errors) or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    Progress, CacheCalibrator = _trt_classes(trt)
    monitor = Progress(progress)
    config.progress_monitor = monitor
    if spec.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 engines keep the unquantized layers in fp16
    calibrator = None
    if spec.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if not has_qdq(spec.onnx_path):  # explicit Q/DQ needs no calibrator
            if spec.calibration_cache is None:
                raise InputError(f"{spec.onnx_path}: int8 engine without Q/DQ nodes needs a calibration cache")
            from edge_mmm.exporters.int8_calibration import format_calibration_cache, read_tensorrt_calibration_cache

            cache = read_tensorrt_calibration_cache(spec.calibration_cache)
            # re-headed for the installed TensorRT, which checks the version in the header
            calibrator = CacheCalibrator(format_calibration_cache(cache.scales, device.trt_version).encode())
            config.int8_calibrator = calibrator
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in spec.shapes:
            raise ModelFileError(f"{spec.onnx_path}: input {tensor.name!r} has no optimization-profile shape")
        r = spec.shapes[tensor.name]
        opt.set_shape(tensor.name, r.min, r.opt, r.max)
        if tensor.is_shape_tensor:  # a scalar whose value drives shapes (e.g. Whisper's `offset`)
            if tensor.name not in spec.values:
                raise ModelFileError(f"{spec.onnx_path}: input {tensor.name!r} is a TensorRT shape tensor "
                                     "without a value range")
            v = spec.values[tensor.name]
            opt.set_shape_input(tensor.name, v.min, v.opt, v.max)
    config.add_optimization_profile(opt)
    timing = timing_cache_path(cache_dir, device)
    cache = config.create_timing_cache(timing.read_bytes() if timing.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeviceError(f"TensorRT failed to build {spec.onnx_path} ({spec.precision}); see the log above")
    atomic_write_bytes(out, bytes(serialized))
    atomic_write_bytes(timing, bytes(config.get_timing_cache().serialize()))
    dt = time.perf_counter() - t0
    progress(f"built {out.name} in {dt:.1f} s")
    return EngineBuild(out, key, cached=False, build_s=dt)


def build_plan(plan: Sequence[Mapping], base: Path, cache_dir: Path,
               progress: Callable[[str], None] = _stderr_progress) -> Dict[str, EngineBuild]:
    """Build every engine of a bundle's build plan (entries of EngineSpec.to_dict(relative_to=base)),
    keyed by ONNX path relative to `base`; engines already in `cache_dir` are reused."""
    device = current_device_identity()
    return {entry["onnx"]: build_engine(EngineSpec.from_dict(entry, base), cache_dir, device=device,
                                        progress=progress) for entry in plan}


__all__ = ["ShapeRange", "EngineSpec", "DeviceIdentity", "EngineBuild", "dim_ranges", "profile_shapes",
           "onnx_input_dims", "plan_engine", "engine_cache_key", "engine_path", "timing_cache_path",
           "current_device_identity", "build_engine", "build_plan", "atomic_write_bytes", "has_qdq",
           "value_ranges"]
