"""Detect the current machine and match it to a device profile.

Evidence, in order: Jetson files (`/etc/nv_tegra_release`, `/proc/device-tree/model`), `nvidia-smi`,
else a plain CPU with its RAM from `/proc/meminfo` (or psutil). Every source is injectable so tests run
on any machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .profile import GIB, DeviceProfile, list_profiles

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"]
CPU_USABLE_FRACTION = 0.75  # matches cpu-x86.toml: leave a quarter to the OS and other programs
# Jetson device-tree model substrings -> profile id (8 GB Nano; the 4 GB Nano has no profile).
JETSON_MODELS = (("agx orin", "agx-orin-64gb"), ("orin nx", "orin-nx-16gb"), ("orin nano", "orin-nano-8gb"))
# nvidia-smi GPU name substrings -> profile id; other GPUs get x86-cuda-12gb with their own memory.
GPU_NAMES = (("h100", "x86-cuda-h100-80gb"),)


@dataclass
class DetectedDevice:
    """What was found and which profile it maps to (`profile` carries detected memory numbers)."""

    profile_id: str
    description: str
    evidence: List[str] = field(default_factory=list)
    memory_total_gib: Optional[float] = None
    compute_capability: Optional[str] = None
    l4t_release: Optional[str] = None
    profile: Optional[DeviceProfile] = None

    def to_dict(self) -> dict:
        return {"profile_id": self.profile_id, "description": self.description, "evidence": self.evidence,
                "memory_total_gib": self.memory_total_gib, "compute_capability": self.compute_capability,
                "l4t_release": self.l4t_release}


def _read(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    try:
        return Path(path).read_bytes().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def meminfo_total_gib(text: Optional[str]) -> Optional[float]:
    """MemTotal from /proc/meminfo text, in GiB."""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text or "", re.M)
    return int(m.group(1)) * 1024 / GIB if m else None


def parse_l4t_release(text: Optional[str]) -> Optional[str]:
    """'# R36 (release), REVISION: 4.3, ...' -> '36.4.3'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_nvidia_smi(text: Optional[str]) -> List[dict]:
    """Rows of `name, memory.total [MiB], compute_cap` from nvidia-smi CSV output."""
    gpus = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[1].replace(".", "", 1).isdigit():
            gpus.append({"name": parts[0], "memory_mib": float(parts[1]), "compute_cap": parts[2]})
    return gpus


def run_nvidia_smi(cmd: Sequence[str] = NVIDIA_SMI_QUERY, timeout: float = 10.0) -> Optional[str]:
    """nvidia-smi's CSV output, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _psutil_total_gib() -> Optional[float]:
    try:
        import psutil  # optional
    except ImportError:
        return None
    return psutil.virtual_memory().total / GIB


def detect(
    nv_tegra_release: Optional[Path] = Path("/etc/nv_tegra_release"),
    device_tree_model: Optional[Path] = Path("/proc/device-tree/model"),
    meminfo: Optional[Path] = Path("/proc/meminfo"),
    nvidia_smi: Optional[Callable[[], Optional[str]]] = run_nvidia_smi,
    nvpmodel: Optional[Callable[[], Optional[str]]] = None,
    profiles: Optional[List[DeviceProfile]] = None,
) -> DetectedDevice:
    """Detect this machine. Pass None (or other paths/callables) to skip or fake a source."""
    by_id = {p.id: p for p in (profiles if profiles is not None else list_profiles())}
    mem = meminfo_total_gib(_read(meminfo))
    tegra = _read(nv_tegra_release)
    model = _read(device_tree_model) or ""
    evidence = []
    if tegra or "jetson" in model.lower():
        l4t = parse_l4t_release(tegra)
        evidence += [f"nv_tegra_release: L4T {l4t}"] if tegra else []
        evidence += [f"device-tree model: {model}"] if model else []
        pid = next((p for key, p in JETSON_MODELS if key in model.lower()), None)
        if pid == "orin-nano-8gb" and mem is not None and mem < 6:
            pid = None  # Orin Nano 4GB: no profile
        mode = nvpmodel() if nvpmodel else None
        if pid == "orin-nano-8gb" and mode and "SUPER" in mode.upper():
            pid = "orin-nano-8gb-super"
            evidence.append("nvpmodel: MAXN SUPER")
        if pid is None or pid not in by_id:
            what = f"unknown Jetson '{model or 'no device-tree model'}' ({mem or '?'} GiB): no profile"
            return DetectedDevice("", what, evidence, mem, "8.7", l4t, None)
        prof = by_id[pid]
        return DetectedDevice(pid, f"{prof.name} ({model})" if model else prof.name, evidence, mem,
                              prof.compute_capability, l4t, prof)
    gpus = parse_nvidia_smi(nvidia_smi() if nvidia_smi else None)
    if gpus:
        g = gpus[0]
        evidence.append(f"nvidia-smi: {g['name']}, {g['memory_mib']:.0f} MiB, sm {g['compute_cap']}")
        pid = next((p for key, p in GPU_NAMES if key in g["name"].lower()), "x86-cuda-12gb")
        base = by_id[pid]
        total = g["memory_mib"] / 1024
        usable = max(total - (base.memory_total_gib - base.memory_usable_gib), 0.5)
        prof = base.with_memory(total, usable)
        if pid == "x86-cuda-12gb":  # unknown GPU: keep the generic bandwidth, use its own identity
            prof = replace(prof, name=f"x86 + {g['name']}", compute_capability=g["compute_cap"])
        return DetectedDevice(pid, prof.name, evidence, total, g["compute_cap"], None, prof)
    if mem is None:
        mem = _psutil_total_gib()
        evidence.append("psutil: virtual_memory" if mem else "memory size unknown")
    else:
        evidence.append(f"/proc/meminfo: MemTotal {mem:.1f} GiB")
    base = by_id["cpu-x86"]
    prof = base.with_memory(mem, mem * CPU_USABLE_FRACTION) if mem else base
    return DetectedDevice("cpu-x86", f"CPU only ({mem:.1f} GiB RAM)" if mem else "CPU only", evidence, mem, None,
                          None, prof)
