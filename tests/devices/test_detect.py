"""Detection from injected files and nvidia-smi output."""

from edge_mmm.devices.detect import detect, parse_l4t_release, parse_nvidia_smi

MEMINFO_8G = "MemTotal:        7620456 kB\nMemFree:  100 kB\n"
MEMINFO_24G = "MemTotal:       24683848 kB\n"


def _files(tmp_path, **contents):
    paths = {}
    for name, text in contents.items():
        p = tmp_path / name
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        paths[name] = p
    return paths


def test_cpu_only(tmp_path):
    f = _files(tmp_path, meminfo=MEMINFO_24G)
    d = detect(nv_tegra_release=tmp_path / "none", device_tree_model=tmp_path / "none", meminfo=f["meminfo"],
               nvidia_smi=lambda: None)
    assert d.profile_id == "cpu-x86"
    assert abs(d.memory_total_gib - 23.54) < 0.01
    assert abs(d.profile.memory_usable_gib - 0.75 * 23.54) < 0.02


def test_jetson_orin_nano(tmp_path):
    f = _files(tmp_path, rel="# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n",
               model=b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00", meminfo=MEMINFO_8G)
    d = detect(f["rel"], f["model"], f["meminfo"], nvidia_smi=lambda: None)
    assert d.profile_id == "orin-nano-8gb" and d.l4t_release == "36.4.3"
    d = detect(f["rel"], f["model"], f["meminfo"], nvidia_smi=lambda: None, nvpmodel=lambda: "NV Power Mode: MAXN_SUPER\n2")
    assert d.profile_id == "orin-nano-8gb-super"


def test_jetson_nx_agx_and_unknown(tmp_path):
    f = _files(tmp_path, nx=b"NVIDIA Jetson Orin NX Engine (16GB ram)\x00", agx=b"Jetson AGX Orin Developer Kit\x00",
               nano4=b"NVIDIA Jetson Orin Nano Developer Kit\x00", meminfo=MEMINFO_8G,
               small="MemTotal: 3800000 kB\n")
    assert detect(None, f["nx"], f["meminfo"], None).profile_id == "orin-nx-16gb"
    assert detect(None, f["agx"], f["meminfo"], None).profile_id == "agx-orin-64gb"
    d = detect(None, f["nano4"], f["small"], None)  # the 4 GB Nano has no profile
    assert d.profile_id == "" and d.profile is None and "unknown Jetson" in d.description


def test_nvidia_smi(tmp_path):
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 9.0\n") == [
        {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559.0, "compute_cap": "9.0"}]
    d = detect(None, None, None, nvidia_smi=lambda: "NVIDIA H100 80GB HBM3, 81559, 9.0\n")
    assert d.profile_id == "x86-cuda-h100-80gb" and d.compute_capability == "9.0"
    d = detect(None, None, None, nvidia_smi=lambda: "NVIDIA GeForce RTX 4090, 24564, 8.9\n")
    assert d.profile_id == "x86-cuda-12gb"
    assert d.profile.compute_capability == "8.9" and abs(d.profile.memory_total_gib - 23.99) < 0.01
    assert "RTX 4090" in d.profile.name


def test_parse_l4t():
    assert parse_l4t_release("# R35 (release), REVISION: 5.0, GCID") == "35.5.0"
    assert parse_l4t_release("garbage") is None
