"""Device profiles: one TOML file per target machine, loaded into a `DeviceProfile` dataclass.

The packaged profiles live in `devices/profiles/*.toml`; every number in them carries its source in a
comment. A malformed file is an `InputError` naming the file and the field.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Tuple, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from edge_mmm.errors import DeviceError, InputError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
GIB = 1 << 30
MIB = 1 << 20

KINDS = ("jetson", "cuda", "cpu")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
BACKENDS = ("tensorrt", "torch", "onnxruntime")
ACTIVATION_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DeviceProfile:
    """What the planner and the exporters need to know about one target machine."""

    id: str
    name: str
    kind: str  # jetson | cuda | cpu
    unified_memory: bool  # CPU and GPU share one memory (Jetson, CPU-only)
    memory_total_gib: float
    memory_usable_gib: float  # the plan budget: what our process may use
    bandwidth_gbs: float  # DRAM bandwidth, GB/s (1e9)
    compute_capability: str  # "8.7"; "" for CPU-only
    precisions: Tuple[str, ...]
    default_backends: Tuple[str, ...]
    activation_dtype: str  # fp16 on GPUs, fp32 on CPU
    default_context: int
    prefill_chunk: int  # LM prefill tokens per forward
    vision_batch: int  # image tiles per vision-encoder call
    trt_workspace_mib: int  # TensorRT builder workspace pool (0: no TensorRT)
    runtime_overhead_mib: int  # CUDA context + libraries + interpreter
    tensorrt_version: str  # "" when TensorRT does not apply
    jetpack: str  # "" when not a Jetson
    torch_runtime_mib: int = 0  # the part of runtime_overhead_mib that importing torch adds (0: not split)
    source: str = ""  # file the profile came from

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_usable_gib * GIB)

    def supports(self, precision: str) -> bool:
        """True when the device computes or stores `precision` natively."""
        return precision in self.precisions

    def with_memory(self, total_gib: float, usable_gib: float) -> "DeviceProfile":
        """A copy with the memory numbers of a detected machine."""
        return replace(self, memory_total_gib=round(total_gib, 2), memory_usable_gib=round(usable_gib, 2))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precisions"] = list(self.precisions)
        d["default_backends"] = list(self.default_backends)
        return d


_TYPES = {f.name: f.type for f in fields(DeviceProfile)}
_OPTIONAL = {"source", "torch_runtime_mib"}


def _check_field(path: Path, key: str, value, want: str):
    """Convert/validate one TOML value against the dataclass field type string."""
    where = f"{path}: field '{key}'"
    if want == "str":
        if not isinstance(value, str):
            raise InputError(f"{where} must be a string, got {value!r}")
        return value
    if want == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{where} must be true or false, got {value!r}")
        return value
    if want == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{where} must be a non-negative integer, got {value!r}")
        return value
    if want == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InputError(f"{where} must be a positive number, got {value!r}")
        return float(value)
    if want.startswith("Tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
            raise InputError(f"{where} must be a non-empty list of strings, got {value!r}")
        return tuple(value)
    raise AssertionError(f"unhandled field type {want}")  # pragma: no cover


def profile_from_dict(data: dict, path: Union[str, Path] = "<dict>") -> DeviceProfile:
    """Validate a parsed TOML table and build the profile; errors name `path` and the field."""
    path = Path(path)
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise InputError(f"{path}: unknown field(s) {', '.join(unknown)}")
    values = {}
    for key, want in _TYPES.items():
        if key not in data:
            if key in _OPTIONAL:
                continue
            raise InputError(f"{path}: missing required field '{key}'")
        values[key] = _check_field(path, key, data[key], want)
    values["source"] = str(path)
    for key, allowed, got in (("kind", KINDS, [values["kind"]]), ("precisions", PRECISIONS, values["precisions"]),
                              ("default_backends", BACKENDS, values["default_backends"]),
                              ("activation_dtype", ACTIVATION_DTYPES, [values["activation_dtype"]])):
        bad = [g for g in got if g not in allowed]
        if bad:
            raise InputError(f"{path}: field '{key}' has {bad}; allowed: {', '.join(allowed)}")
    if values["memory_usable_gib"] > values["memory_total_gib"]:
        raise InputError(f"{path}: field 'memory_usable_gib' ({values['memory_usable_gib']}) exceeds "
                         f"'memory_total_gib' ({values['memory_total_gib']})")
    if values["kind"] != "cpu" and not values["compute_capability"]:
        raise InputError(f"{path}: field 'compute_capability' is required for a {values['kind']} device")
    if values["activation_dtype"] not in values["precisions"]:
        raise InputError(f"{path}: field 'activation_dtype' ({values['activation_dtype']}) is not in 'precisions'")
    for key in ("default_context", "prefill_chunk", "vision_batch"):
        if values[key] < 1:
            raise InputError(f"{path}: field '{key}' must be at least 1")
    return DeviceProfile(**values)


def load_profile(path: Union[str, Path]) -> DeviceProfile:
    """Load one profile TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read device profile ({exc.strerror or exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML ({exc})") from exc
    return profile_from_dict(data, path)


def list_profiles(directory: Union[str, Path] = PROFILES_DIR) -> List[DeviceProfile]:
    """All profiles in `directory`, sorted by id; duplicate ids are an error."""
    out: Dict[str, DeviceProfile] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        prof = load_profile(path)
        if prof.id in out:
            raise InputError(f"{path}: duplicate profile id '{prof.id}' (also in {out[prof.id].source})")
        out[prof.id] = prof
    return [out[k] for k in sorted(out)]


def get_profile(name: str, directory: Union[str, Path] = PROFILES_DIR) -> DeviceProfile:
    """A profile by id, or by path to a TOML file."""
    if name.endswith(".toml") or Path(name).is_file():
        return load_profile(name)
    profiles = {p.id: p for p in list_profiles(directory)}
    if name not in profiles:
        raise DeviceError(f"unknown device profile '{name}'; known: {', '.join(profiles)}")
    return profiles[name]
