"""`--device PROFILE` on run, demo, serve, transcribe, chat and ask: the memory plan is checked before anything
loads (an unfit plan exits 2 with one line), and the profile's backends, precision, context and vision tiling
are what the loaders get, unless a flag says otherwise. Loaders are replaced by recorders: nothing loads."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_mmm.cli import main
from edge_mmm.devices.profile import PROFILES_DIR
from edge_mmm.errors import InputError

TOO_BIG_VLM = {  # an Idefics3 with a Llama-3-70B-sized text model: ~35 GB even at INT4
    "model_type": "idefics3", "scale_factor": 4, "image_token_id": 128257,  # SmolVLM's vision tower
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
    "text_config": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "vocab_size": 128260, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
}


def _record(monkeypatch, target: str, calls: list):
    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        raise InputError("recorded instead of loading")

    monkeypatch.setattr(target, recorder)


@pytest.fixture
def big_vlm(tmp_path) -> Path:
    d = tmp_path / "big-vlm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TOO_BIG_VLM))
    (d / "tokenizer.json").write_text("{}")  # present, never read: the plan refuses first
    return d


@pytest.fixture
def smolvlm_dims(tmp_path) -> Path:
    """A config with SmolVLM-256M's dimensions; the config is all the plan reads."""
    vlm = tmp_path / "smolvlm-256m-config"
    vlm.mkdir()
    small = json.loads(json.dumps(TOO_BIG_VLM))
    small["text_config"].update(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49280)
    (vlm / "config.json").write_text(json.dumps(small))
    return vlm


@pytest.fixture
def small_device(tmp_path) -> Path:
    """cpu-x86 with 0.2 GiB usable: nothing fits."""
    text = (PROFILES_DIR / "cpu-x86.toml").read_text()
    text = text.replace('id = "cpu-x86"', 'id = "tiny-mem"').replace("memory_total_gib = 16.0", "memory_total_gib = 0.25")
    text = text.replace("memory_usable_gib = 12.0", "memory_usable_gib = 0.2")
    path = tmp_path / "tiny-mem.toml"
    path.write_text(text)
    return path


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path)
    return path


@pytest.fixture
def lm_file():
    from edge_mmm.errors import ModelFileError
    from edge_mmm.text.api import default_lm_path

    try:
        return default_lm_path()
    except ModelFileError as exc:
        pytest.skip(str(exc))


def _refused(capsys, argv, device: str):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"error: plan does not fit on {device}: needs ") and "MiB usable" in err, err
    assert err.count("\n") == 1, err
    return err


def test_run_refuses_a_vlm_too_big_for_orin_nano_before_loading(capsys, monkeypatch, big_vlm, tmp_path):
    calls = []
    _record(monkeypatch, "edge_mmm.runtime.assistant.LiveAssistant", calls)
    err = _refused(capsys, ["run", "--device", "orin-nano-8gb", "--model", str(big_vlm), "--camera", "none",
                            "--mic", str(tmp_path / "never-opened.wav")], "orin-nano-8gb")
    assert "choose a smaller model" in err or "cheapest change" in err
    assert not calls  # nothing was constructed, no source opened


def test_run_cpu_x86_loads_the_profile_choice(capsys, monkeypatch, tmp_path, smolvlm_dims):
    vlm = smolvlm_dims
    calls = []
    _record(monkeypatch, "edge_mmm.runtime.assistant.LiveAssistant", calls)
    argv = ["run", "--device", "cpu-x86", "--model", str(vlm), "--camera", "none", "--mic", str(tmp_path / "q.wav")]
    assert main(argv) == 2
    cfg = calls[-1][0][0]
    assert (cfg.asr_backend, cfg.vlm_backend, cfg.vlm_quantize) == ("onnxruntime", "onnxruntime", "int4")
    assert (cfg.context_length, cfg.vision_batch, cfg.vlm_lm_backend) == (2048, 1, "onnxruntime")
    assert main(argv + ["--vlm-backend", "torch", "--quantize", "float", "--context", "1536",
                        "--vlm-lm-backend", "torch"]) == 2
    cfg = calls[-1][0][0]
    assert (cfg.vlm_backend, cfg.vlm_quantize, cfg.context_length) == ("torch", None, 1536)  # flags win
    assert cfg.vlm_lm_backend == "torch"
    capsys.readouterr()


def test_run_prints_its_choice_in_the_first_notice(capsys, monkeypatch, lm_file, tmp_path):
    import wave

    from edge_mmm.runtime import assistant as live

    # no model loads and no thread starts: the run ends at once and prints the events it has
    monkeypatch.setattr(live, "load_live_models", lambda config: live.LiveModels(None, None))
    monkeypatch.setattr(live.LiveAssistant, "start", lambda self: self.finished.set())
    monkeypatch.setattr(live.LiveAssistant, "stop", lambda self, timeout=None: True)
    clip = tmp_path / "q.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    rc = main(["run", "--device", "cpu-x86", "--model", str(lm_file), "--camera", "none", "--mic", str(clip),
               "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    events = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    notices = [e["data"]["message"] for e in events if e["type"] == "notice"]
    assert notices[0].startswith("device cpu-x86, asr onnxruntime, lm onnxruntime, context 2048, plan "), notices
    # onnxruntime everywhere: no torch in the process, none in the plan; a torch backend brings it back
    import re

    def planned(argv_extra):
        assert main(["run", "--device", "cpu-x86", "--model", str(lm_file), "--camera", "none", "--mic", str(clip),
                     "--json"] + argv_extra) == 0
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        message = next(e["data"]["message"] for e in events if e["type"] == "notice")
        return int(re.search(r"plan ([\d,]+) of", message).group(1).replace(",", ""))

    from edge_mmm.devices.profile import get_profile

    assert planned(["--backend", "torch"]) - planned([]) >= get_profile("cpu-x86").torch_runtime_mib


def test_transcribe_device(capsys, monkeypatch, small_device, tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")
    _refused(capsys, ["transcribe", "--device", str(small_device), str(audio)], "tiny-mem")
    calls = []
    _record(monkeypatch, "edge_mmm.asr.api.load_asr", calls)
    assert main(["transcribe", "--device", "cpu-x86", str(audio)]) == 2
    assert (calls[-1][1]["backend"], calls[-1][1]["device"]) == ("onnxruntime", "cpu")
    assert main(["transcribe", "--device", "cpu-x86", "--backend", "torch", str(audio)]) == 2
    assert calls[-1][1]["backend"] == "torch"
    assert main(["transcribe", "--device", "cpu", str(audio)]) == 2  # the torch-device meaning still works
    assert calls[-1][1]["device"] == "cpu"
    capsys.readouterr()


def test_chat_device(capsys, monkeypatch, small_device, lm_file):
    _refused(capsys, ["chat", "--device", str(small_device), "--model", str(lm_file), "--prompt", "hi"], "tiny-mem")
    calls = []
    _record(monkeypatch, "edge_mmm.text.api.load_lm", calls)
    assert main(["chat", "--device", "cpu-x86", "--model", str(lm_file), "--prompt", "hi"]) == 2
    assert (calls[-1][1]["backend"], calls[-1][1]["context_length"]) == ("onnxruntime", 2048)
    assert main(["chat", "--device", "agx-orin-64gb", "--model", str(lm_file), "--prompt", "hi"]) == 2
    assert (calls[-1][1]["backend"], calls[-1][1]["device"], calls[-1][1]["context_length"]) == ("torch", "cuda", 8192)
    assert main(["chat", "--device", "cpu-x86", "--backend", "torch", "--context", "512", "--model", str(lm_file),
                 "--prompt", "hi"]) == 2
    assert (calls[-1][1]["backend"], calls[-1][1]["context_length"]) == ("torch", 512)
    capsys.readouterr()


def test_ask_device(capsys, monkeypatch, small_device, big_vlm, photo):
    _refused(capsys, ["ask", "--device", "orin-nano-8gb", "--model", str(big_vlm), "--image", str(photo), "What?"],
             "orin-nano-8gb")
    _refused(capsys, ["ask", "--device", str(small_device), "--model", str(big_vlm), "--image", str(photo), "What?"],
             "tiny-mem")
    calls = []
    _record(monkeypatch, "edge_mmm.vision.api.load_vlm", calls)
    assert main(["ask", "--device", "x86-cuda-h100-80gb", "--model", str(big_vlm), "--image", str(photo), "Q?"]) == 2
    kw = calls[-1][1]
    assert (kw["backend"], kw["quantize"], kw["tile_batch"], kw["context_length"]) == ("torch", "int4", 17, 8192)
    assert main(["ask", "--device", "x86-cuda-h100-80gb", "--model", str(big_vlm), "--image", str(photo), "Q?",
                 "--backend", "onnxruntime"]) == 2
    assert len(calls) == 2 and calls[-1][1]["backend"] == "onnxruntime"
    capsys.readouterr()
    # INT8 weights of a 70B LM do not fit in 80 GB: the explicit flag is planned, and refused
    _refused(capsys, ["ask", "--device", "x86-cuda-h100-80gb", "--model", str(big_vlm), "--image", str(photo), "Q?",
                      "--quantize", "int8"], "x86-cuda-h100-80gb")
    assert len(calls) == 2


def test_serve_device(capsys, monkeypatch, small_device, lm_file, smolvlm_dims):
    pytest.importorskip("fastapi")
    _refused(capsys, ["serve", "--device", str(small_device), "--model", str(lm_file)], "tiny-mem")
    calls = []
    _record(monkeypatch, "edge_mmm.serve.app.serve", calls)
    assert main(["serve", "--device", "cpu-x86", "--model", str(lm_file)]) == 2
    settings = calls[-1][0][0]
    assert (settings.lm_backend, settings.asr_backend, settings.context_length) == ("onnxruntime", "onnxruntime",
                                                                                   2048)
    assert main(["serve", "--device", "cpu-x86", "--model", str(lm_file), "--vlm-model", str(smolvlm_dims)]) == 2
    settings = calls[-1][0][0]
    assert (settings.vlm_backend, settings.vlm_quantize, settings.vlm_lm_backend) == ("onnxruntime", "int4",
                                                                                     "onnxruntime")
    capsys.readouterr()


def test_demo_device(capsys, monkeypatch, small_device, lm_file):
    pytest.importorskip("fastapi")
    _refused(capsys, ["demo", "--device", str(small_device), "--model", str(lm_file)], "tiny-mem")
    calls = []
    _record(monkeypatch, "edge_mmm.runtime.assistant.LiveAssistant", calls)
    assert main(["demo", "--device", "cpu-x86", "--model", str(lm_file)]) == 2
    cfg = calls[-1][0][0]
    assert (cfg.lm_backend, cfg.asr_backend, cfg.context_length) == ("onnxruntime", "onnxruntime", 2048)
    capsys.readouterr()
