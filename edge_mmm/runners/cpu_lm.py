"""edge-mmm's own CPU LM kernel (cpu_lm.c): compiled on first use with the system C compiler for this
host's instruction set, kept in a cache directory, called through ctypes. Torch-free.

`CpuLM.forward(tokens, pos, k_arrays, v_arrays, logits)` runs a prompt (prefill) or one token (decode) of a
Llama-family LM whose weights exporters/cpu_lm_pack.py wrote, appending to the caller's per-layer KV arrays
`[1, kv_heads, max_len, head_dim]` (float32, C-contiguous) and writing the last position's logits.

`compile_library` returns None, with the reason, when there is no C compiler (`cc`, or `$CC`), when it
fails, or on a CPU family the kernel has no SIMD path for; the caller then runs the LM on onnxruntime.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_mmm.runners.array_pack import read_array_pack

SOURCE = Path(__file__).with_name("cpu_lm.c")
PACK_JSON = "cpu_lm.json"  # the weights' index (exporters/cpu_lm_pack.py writes both)
PACK_BIN = "cpu_lm.bin"
PACK_FORMAT = 1
LIBRARY = "libedge_cpu_lm.so"
ABI = 5


class _Q4Mat(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("qkv", _Q4Mat), ("o", _Q4Mat),
                ("gate_up", _Q4Mat), ("down", _Q4Mat)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("hidden", "layers", "heads", "kv_heads", "head_dim", "inter", "vocab", "max_pos")] + [
        ("eps", ctypes.c_float), ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p),
        ("emb_codes", ctypes.c_void_p), ("emb_scales", ctypes.c_void_p), ("head_codes", ctypes.c_void_p),
        ("head_scales", ctypes.c_void_p), ("final_norm", ctypes.c_void_p), ("layer", ctypes.POINTER(_Layer))]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def native_arch() -> Optional[List[str]]:
    """The compiler flags that target this host's CPU, or None for a CPU family the kernel has no SIMD path for
    (x86-64 only for now: AVX-512 or AVX2 + FMA; the plain-C path is ~8x slower than onnxruntime, so an ARM
    CPU, Jetson's included, keeps onnxruntime until a NEON path exists)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    return None


def compile_library(cache_dir: Path, arch: Optional[Sequence[str]] = None) -> Tuple[Optional[ctypes.CDLL], str]:
    """(the loaded library, its instruction set) or (None, why not). Built once per source, compiler, flags and
    CPU (the key hashes them all: a cache shared between hosts never runs code built for another CPU).
    `arch`: target flags other than this host's (tests build the AVX2 and generic variants this way)."""
    cc = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not cc:
        return None, "no C compiler (cc) on PATH"
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {' '.join(cc)} does not run: {e}"
    arch = list(arch) if arch is not None else native_arch()
    if arch is None:
        return None, f"no SIMD path for CPU family {platform.machine()}"
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + _cpu_flags().encode()
                         + platform.machine().encode() + " ".join(arch).encode()).hexdigest()[:24]
    entry = Path(cache_dir) / key
    lib_path = entry / LIBRARY
    if not lib_path.is_file():
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        except OSError as e:
            return None, f"cannot write the kernel build into {entry.parent}: {e}"
        try:
            cmd = [*cc, "-O3", *arch, "-pthread", "-std=c11", "-shared", "-fPIC", "-o", str(tmp / LIBRARY),
                   str(SOURCE), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                return None, f"{' '.join(cc)} failed: {last}"
            try:
                os.replace(tmp, entry)
            except OSError:  # another process finished first: use its build
                pass
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"{' '.join(cc)} failed: {e}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        return None, f"cannot load {lib_path}: {e}"
    if lib.edge_lm_abi() != ABI:
        return None, f"{lib_path}: ABI {lib.edge_lm_abi()} != {ABI}"
    lib.edge_lm_isa.restype = ctypes.c_char_p
    lib.edge_forward.restype = ctypes.c_int
    lib.edge_forward.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64,
                                 ctypes.c_void_p]
    lib.edge_lm_set_threads.argtypes = [ctypes.c_int]
    lib.edge_whisper_step.restype = ctypes.c_int
    lib.edge_whisper_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib, lib.edge_lm_isa().decode()


CACHE_KIND = "cpu-lm"  # the builds' folder in the cache root
_notes = set()


def host_library(cache_root: Path) -> Optional[ctypes.CDLL]:
    """The kernel built for this host (under `cache_root`/cpu-lm), or None: off (`EDGE_MMM_CPU_KERNEL=0`), no C
    compiler, a CPU without a SIMD path (an x86 without AVX2 + FMA, where onnxruntime is faster than plain C;
    ARM). The reason is printed to stderr once per process; the callers run onnxruntime in its place."""
    import sys

    if os.environ.get("EDGE_MMM_CPU_KERNEL", "1") == "0":
        return None
    lib, isa = compile_library(Path(cache_root) / CACHE_KIND)
    if lib is not None and isa == "generic":
        lib, isa = None, "this CPU has no AVX2 + FMA"
    if lib is None and isa not in _notes:
        _notes.add(isa)
        print(f"edge-mmm: the CPU kernel is off ({isa}); onnxruntime runs the LM and Whisper's decoder "
              "(slower)", file=sys.stderr)
    return lib


def default_threads() -> int:
    """The physical cores this process may run on (as onnxruntime's default): the CPUs in its affinity mask,
    halved where /proc/cpuinfo reports two hardware threads per core."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        info = Path("/proc/cpuinfo").read_text()
        siblings = int(info.split("siblings", 1)[1].split(":", 1)[1].split()[0])
        cores = int(info.split("cpu cores", 1)[1].split(":", 1)[1].split()[0])
        if siblings > cores > 0:
            n = max(1, n * cores // siblings)
    except (OSError, IndexError, ValueError):
        pass
    return max(1, n)


def read_pack(json_path: Path, bin_path: Path) -> Tuple[Optional[dict], Dict[str, np.ndarray], str]:
    """(config or None, arrays, reason): the pack exporters/cpu_lm_pack.py wrote (`runners.array_pack`)."""
    meta, arrays = read_array_pack(json_path, bin_path)
    if meta.get("format") != PACK_FORMAT:
        raise ValueError(f"{json_path}: not a CPU kernel pack of format {PACK_FORMAT}")
    if not meta.get("supported"):
        return None, {}, meta.get("reason", "not supported")
    check_pack(meta["config"], arrays, str(json_path))
    return meta["config"], arrays, ""


def expected_arrays(config: dict) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """name -> (dtype, shape) of every array the kernel reads for `config` (biases and the head optional)."""
    c = {k: int(config[k]) for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "inter", "vocab", "max_pos")}
    h, v = c["hidden"], c["vocab"]
    qkv = (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"]
    mats = {"qkv": (qkv, h), "o": (h, c["heads"] * c["head_dim"]), "gate_up": (2 * c["inter"], h), "down": (h, c["inter"])}
    out = {"emb.codes": ("|i1", (v, h)), "emb.scales": ("<f4", (v, h // 32)), "final_norm": ("<f4", (h,)),
           "rope.cos": ("<f4", (c["max_pos"], c["head_dim"] // 2)), "rope.sin": ("<f4", (c["max_pos"], c["head_dim"] // 2)),
           "head.codes": ("|i1", (v, h)), "head.scales": ("<f4", (v, h // 32))}
    for i in range(c["layers"]):
        out[f"layers.{i}.attn_norm"] = ("<f4", (h,))
        out[f"layers.{i}.ffn_norm"] = ("<f4", (h,))
        for name, (n, k) in mats.items():
            out[f"layers.{i}.{name}.codes"] = ("|u1", (n, k // 32, 16))
            out[f"layers.{i}.{name}.d"] = ("<f4", (n, k // 32))
            out[f"layers.{i}.{name}.m"] = ("<f4", (n, k // 32))
            out[f"layers.{i}.{name}.bias"] = ("<f4", (n,))
    return out


def check_pack(config: dict, arrays: Dict[str, np.ndarray], where: str) -> None:
    """ValueError naming the array unless `arrays` are exactly what the kernel reads for `config` (the C code
    trusts these shapes: a pack from an untrusted bundle must not make it read out of bounds)."""
    dims = ("hidden", "layers", "heads", "kv_heads", "head_dim", "inter", "vocab", "max_pos")
    bad = [k for k in dims if not isinstance(config.get(k), int) or not 0 < config[k] <= 1 << 20]
    if bad or config["hidden"] % 32 or config["inter"] % 32 or config["head_dim"] % 2 \
            or config["heads"] % config["kv_heads"] or (config["heads"] * config["head_dim"]) % 32:
        raise ValueError(f"{where}: bad config {bad or config}")
    if not isinstance(config.get("eps"), float) or not 0 < config["eps"] < 1:
        raise ValueError(f"{where}: bad eps {config.get('eps')!r}")
    want = expected_arrays(config)
    optional = {n for n in want if n.endswith(".bias")} | ({"head.codes", "head.scales"} if config.get("tied") else set())
    for name, (dtype, shape) in want.items():
        a = arrays.get(name)
        if a is None:
            if name in optional:
                continue
            raise ValueError(f"{where}: array {name} is missing")
        if a.dtype.str != dtype or tuple(a.shape) != shape:
            raise ValueError(f"{where}: array {name} is {a.dtype.str} {tuple(a.shape)}, expected {dtype} {shape}")
    extra = set(arrays) - set(want)
    if extra:
        raise ValueError(f"{where}: unexpected arrays {sorted(extra)[:3]}")
    if not config.get("tied") and "head.codes" not in arrays:
        raise ValueError(f"{where}: an untied model needs head.codes")


class CpuLM:
    """Prefill or decode calls on the caller's KV arrays; holds the weights (numpy) and the C structs."""

    def __init__(self, lib: ctypes.CDLL, isa: str, config: dict, arrays: Dict[str, np.ndarray], threads: int = 0):
        self.lib, self.isa, self.config, self._arrays = lib, isa, config, arrays
        c = config
        ptr = lambda name: arrays[name].ctypes.data if name in arrays else None  # noqa: E731

        def q4(prefix: str) -> _Q4Mat:
            codes = arrays[f"{prefix}.codes"]
            return _Q4Mat(ptr(f"{prefix}.codes"), ptr(f"{prefix}.d"), ptr(f"{prefix}.m"), ptr(f"{prefix}.bias"),
                          codes.shape[0], codes.shape[1] * 32)

        self._layers = (_Layer * c["layers"])(*[
            _Layer(ptr(f"layers.{i}.attn_norm"), ptr(f"layers.{i}.ffn_norm"), q4(f"layers.{i}.qkv"),
                   q4(f"layers.{i}.o"), q4(f"layers.{i}.gate_up"), q4(f"layers.{i}.down"))
            for i in range(c["layers"])])
        head = "emb" if c["tied"] else "head"
        self._model = _Model(c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["head_dim"], c["inter"],
                             c["vocab"], c["max_pos"], c["eps"], ptr("rope.cos"), ptr("rope.sin"),
                             ptr("emb.codes"), ptr("emb.scales"), ptr(f"{head}.codes"), ptr(f"{head}.scales"),
                             ptr("final_norm"), self._layers)
        self._kv = None
        lib.edge_lm_set_threads(int(threads) if threads and threads > 0 else default_threads())

    def forward(self, tokens: Sequence[int], pos: int, k_arrays: Sequence[np.ndarray], v_arrays: Sequence[np.ndarray],
                logits: np.ndarray) -> None:
        """Run `tokens` (a prompt, or one token to decode) at positions `pos`.. on the cache arrays, appending
        their keys and values, and write the float32 logits of the last one into `logits` [vocab]."""
        key = (id(k_arrays[0]), id(v_arrays[0]))
        if self._kv is None or self._kv[0] != key:  # the pointer tables of the last cache used
            n = self.config["layers"]
            for a in list(k_arrays) + list(v_arrays):
                if a.dtype != np.float32 or not a.flags.c_contiguous or a.shape[-1] != self.config["head_dim"]:
                    raise ValueError("KV arrays must be C-contiguous float32 [1, kv_heads, max_len, head_dim]")
            self._kv = (key, (ctypes.c_void_p * n)(*[a.ctypes.data for a in k_arrays]),
                        (ctypes.c_void_p * n)(*[a.ctypes.data for a in v_arrays]), list(k_arrays) + list(v_arrays))
        _, ks, vs, _ = self._kv
        max_len = k_arrays[0].shape[-2]
        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        if logits.dtype != np.float32 or logits.shape != (self.config["vocab"],) or not logits.flags.c_contiguous:
            raise ValueError(f"logits must be a C-contiguous float32 [{self.config['vocab']}] array")
        rc = self.lib.edge_forward(ctypes.byref(self._model), ids.ctypes.data, ids.size, int(pos), ks, vs, max_len,
                                   logits.ctypes.data)
        if rc:
            raise ValueError(f"CPU forward failed (code {rc}): {ids.size} token(s) at position {pos}, cache {max_len}, "
                             f"vocabulary {self.config['vocab']}")
