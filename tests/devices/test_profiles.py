"""Every packaged device profile loads; bad files fail with the file and field named."""

from pathlib import Path

import pytest

from edge_mmm.devices.profile import PROFILES_DIR, get_profile, list_profiles, load_profile
from edge_mmm.errors import DeviceError, InputError

EXPECTED = {"orin-nano-8gb", "orin-nano-8gb-super", "orin-nx-16gb", "agx-orin-64gb", "x86-cuda-h100-80gb",
            "x86-cuda-12gb", "cpu-x86"}


def test_all_profiles_load():
    profiles = {p.id: p for p in list_profiles()}
    assert set(profiles) == EXPECTED
    for p in profiles.values():
        assert 0 < p.memory_usable_gib <= p.memory_total_gib
        assert p.bandwidth_gbs > 0 and p.default_context >= 512
        assert p.activation_dtype in p.precisions
        assert Path(p.source).parent == PROFILES_DIR


def test_every_number_has_a_source_comment():
    for path in PROFILES_DIR.glob("*.toml"):
        lines = path.read_text().splitlines()
        for key in ("memory_total_gib", "bandwidth_gbs"):
            i = next(n for n, line in enumerate(lines) if line.startswith(key))
            assert lines[i - 1].startswith("#"), f"{path.name}: {key} has no source comment"


def test_orin_facts():
    for pid in ("orin-nano-8gb", "orin-nano-8gb-super", "orin-nx-16gb", "agx-orin-64gb"):
        p = get_profile(pid)
        assert p.compute_capability == "8.7" and not p.supports("fp8")  # no FP8 on sm_87
        assert p.unified_memory and p.kind == "jetson"
    assert get_profile("orin-nano-8gb").bandwidth_gbs == 68.0
    assert get_profile("orin-nano-8gb-super").bandwidth_gbs == 102.0
    assert get_profile("x86-cuda-h100-80gb").supports("fp8")
    assert not get_profile("cpu-x86").supports("fp16")


def test_unknown_profile():
    with pytest.raises(DeviceError, match="unknown device profile 'nope'"):
        get_profile("nope")


def _write(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


def test_bad_toml_names_file(tmp_path):
    p = _write(tmp_path, "id = \n")
    with pytest.raises(InputError, match=r"bad\.toml: invalid TOML"):
        load_profile(p)


def test_missing_field_names_file_and_field(tmp_path):
    text = (PROFILES_DIR / "cpu-x86.toml").read_text()
    p = _write(tmp_path, "\n".join(l for l in text.splitlines() if not l.startswith("bandwidth_gbs")))
    with pytest.raises(InputError, match=r"bad\.toml: missing required field 'bandwidth_gbs'"):
        load_profile(p)


def test_wrong_type_and_values(tmp_path):
    text = (PROFILES_DIR / "orin-nano-8gb.toml").read_text()
    with pytest.raises(InputError, match="field 'memory_total_gib' must be a positive number"):
        load_profile(_write(tmp_path, text.replace("memory_total_gib = 8.0", 'memory_total_gib = "8"')))
    with pytest.raises(InputError, match="field 'precisions'"):
        load_profile(_write(tmp_path, text.replace('"int4"]', '"int3"]')))
    with pytest.raises(InputError, match="exceeds"):
        load_profile(_write(tmp_path, text.replace("memory_usable_gib = 5.0", "memory_usable_gib = 9.0")))
    with pytest.raises(InputError, match="unknown field"):
        load_profile(_write(tmp_path, text + "\nextra = 1\n"))
