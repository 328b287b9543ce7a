"""Bad input through the CLI: exit code 2, one line on stderr naming the file, nothing written half-way."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edge_mmm.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


def _write_wav(path, seconds):
    import wave

    n = int(16000 * seconds)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.zeros(n, np.int16)).tobytes())


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "transcribe", str(tmp_path / "nope.wav"))
    assert_one_line_error(code, err, "nope.wav")


def test_non_audio_file(capsys, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio at all\n" * 50)
    code, _, err = run_cli(capsys, "transcribe", str(bad), "--backend", "torch")
    assert_one_line_error(code, err, "notes.wav")


def test_empty_file(capsys, tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    code, _, err = run_cli(capsys, "transcribe", str(empty), "--backend", "torch")
    assert_one_line_error(code, err, "empty.wav")


@pytest.mark.parametrize("seconds", [0.0, 0.1])
def test_too_short_file(capsys, tmp_path, seconds):
    short = tmp_path / "short.wav"
    _write_wav(short, seconds)
    code, _, err = run_cli(capsys, "transcribe", str(short), "--backend", "torch")
    assert_one_line_error(code, err, "short.wav")


def test_a_bad_file_among_several_is_skipped(capsys, tmp_path, tiny_en_dir):
    """Several files, one unreadable: the others are transcribed, one error line names the bad one, exit 2
    (as openai-whisper's CLI skips a file it cannot read)."""
    good_a, good_b, bad = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "broken.wav"
    _write_wav(good_a, 1.0)
    _write_wav(good_b, 1.5)
    bad.write_bytes(b"RIFF" + bytes(200))
    code, out, err = run_cli(capsys, "transcribe", str(good_a), str(bad), str(good_b), "--model", str(tiny_en_dir),
                             "--json")
    assert_one_line_error(code, err, "broken.wav")
    import json

    assert [json.loads(line)["timings"]["audio_s"] for line in out.strip().splitlines()] == [1.0, 1.5]
    code, out, err = run_cli(capsys, "transcribe", str(good_a), str(tmp_path / "typo.wav"), "--model",
                             str(tiny_en_dir), "--json")  # a missing file among several is skipped the same way
    assert_one_line_error(code, err, "typo.wav")
    assert len(out.strip().splitlines()) == 1


def test_truncated_model(capsys, tmp_path, tiny_en_dir):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_en_dir / "tokenizer.json", model / "tokenizer.json")
    data = (tiny_en_dir / "model.bin").read_bytes()
    (model / "model.bin").write_bytes(data[: len(data) // 3])
    clip = tmp_path / "ok.wav"
    _write_wav(clip, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(clip), "--model", str(model))
    assert_one_line_error(code, err, "model.bin")


def test_broken_tokenizer_fails_before_the_export(capsys, tmp_path, tiny_en_dir, monkeypatch):
    """A model directory whose tokenizer.json is broken: one line naming it, before a first-use export is
    announced, and nothing is cached."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.bin").symlink_to(tiny_en_dir / "model.bin")
    (model / "tokenizer.json").write_text('{"model": ')
    clip = tmp_path / "ok.wav"
    _write_wav(clip, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(clip), "--model", str(model))
    assert_one_line_error(code, err, "tokenizer.json")
    assert not list((tmp_path / "cache").rglob("*.onnx"))


def test_model_dir_with_wrong_config(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "whisper", "d_model": "big"}')
    (model / "model.safetensors").write_bytes(b"")
    clip = tmp_path / "ok.wav"
    _write_wav(clip, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(clip), "--model", str(model))
    assert_one_line_error(code, err, "config.json")


def test_unknown_model_id(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    clip = tmp_path / "ok.wav"
    _write_wav(clip, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(clip), "--model", "someone/whisper-nothing")
    assert_one_line_error(code, err, "edge-mmm pull someone/whisper-nothing")


def test_bad_backend_flag(capsys, tmp_path):
    clip = tmp_path / "ok.wav"
    _write_wav(clip, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(clip), "--backend", "tensorflow")
    assert_one_line_error(code, err, "--backend")


@pytest.mark.parametrize("flags,needle", [
    (("--language", "xx"), "unknown language code 'xx'"),  # not a Whisper language (openai-whisper refuses it too)
    (("--language", "fr"), "English-only"),  # a real language, but tiny.en only transcribes English
    (("--task", "translate"), "cannot translate"),
])
def test_language_and_task_the_model_cannot_do(capsys, tmp_path, tiny_en_dir, flags, needle):
    clip = tmp_path / "ok.wav"
    _write_wav(clip, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(clip), "--model", str(tiny_en_dir), *flags)
    assert_one_line_error(code, err, needle)


def test_language_code_is_case_insensitive(capsys, tmp_path, tiny_en_dir):
    clip = tmp_path / "ok.wav"
    _write_wav(clip, 1.0)
    code, out, _ = run_cli(capsys, "transcribe", str(clip), "--model", str(tiny_en_dir), "--language", "EN",
                           "--json")
    assert code == 0 and '"language": "en"' in out


@pytest.mark.parametrize("argv,needle", [
    (("transcribe", "clip.wav", "--beam-size", "0"), "--beam-size"),  # a value outside the flag's range
    (("transcribe", "--nosuch"), "No such option: --nosuch"),
    (("chat", "--prompt", "hi", "--max-tokens", "0"), "--max-tokens"),
    (("run", "--camera"), "--camera"),  # a flag without its value
    (("export",), "--out"),  # a required flag missing
    (("nosuchcmd",), "nosuchcmd"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    """Typer's own flag checks (typer >= 0.2x raises them from its vendored click) end like our errors."""
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert "--help" in err


def test_no_command_shows_the_help_only(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and "transcribe" in out + err and "error:" not in out + err and "Traceback" not in err


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "transcribe", str(tmp_path / "nope.wav"))
    assert code == 2 and "Traceback" in err


def test_kernel_mode_flag(capsys, monkeypatch):
    from edge_mmm.kernels.dispatch import get_kernel_mode, set_kernel_mode

    try:
        code, _, err = run_cli(capsys, "--kernels", "bogus", "devices")
        assert_one_line_error(code, err, "kernel mode")
        monkeypatch.setenv("EDGE_MMM_KERNELS", "reference")
        code, _, _ = run_cli(capsys, "devices", "--json")
        assert code == 0 and get_kernel_mode() == "reference"
    finally:
        set_kernel_mode("auto")


@pytest.mark.parametrize("args,needle", [
    (("--device", "cuda", "--backend", "onnxruntime"), "needs --backend torch"),
    (("--device", "tpu"), "--device must be cpu or cuda"),
])
def test_bad_device(capsys, tmp_path, args, needle):
    wav = tmp_path / "a.wav"
    _write_wav(wav, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(wav), *args)
    assert_one_line_error(code, err, needle)


def test_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    wav = tmp_path / "a.wav"
    _write_wav(wav, 1.0)
    code, _, err = run_cli(capsys, "transcribe", str(wav), "--device", "cuda", "--backend", "torch")
    assert_one_line_error(code, err, "no CUDA GPU")


def test_chat_device_errors(capsys):
    import torch

    code, _, err = run_cli(capsys, "chat", "--prompt", "hi", "--device", "cuda", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "needs --backend torch")
    code, _, err = run_cli(capsys, "chat", "--prompt", "hi", "--numerics", "llama.cpp", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "numerics='llama.cpp' needs the torch backend")
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "chat", "--prompt", "hi", "--device", "cuda", "--backend", "torch")
        assert_one_line_error(code, err, "no CUDA GPU")
