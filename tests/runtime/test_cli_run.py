"""`edge-mmm run` end to end with real parts: a video file (skimage photos) as the camera and an espeak-ng
question (padded with silence) as the microphone, played at 3x real time. The text path uses the real
Whisper tiny.en + the real SmolLM2-135M-Instruct GGUF (camera frames ignored, said once); the image path
uses the tiny random Idefics3 (tests/tiny_idefics3.py), so its answer is noise and only the mechanics are
checked. Also: Ctrl-C of a running subprocess, no input devices, and `devices --list-inputs`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path



from conftest import QUESTION, write_video  # noqa: E402
from wer import normalized_wer  # noqa: E402

from edge_mmm.cli import main  # noqa: E402


def _run_json(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    events = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    return rc, events, out.err


def _of(events, kind):
    return [e["data"] for e in events if e["type"] == kind]


def _turn(events):
    turns = [d for d in _of(events, "timing") if d["stage"] == "turn"]
    assert len(turns) == 1
    return turns[0]


def test_run_once_text_model(capsys, question_clip, video_file, tmp_path, smollm2):
    log = tmp_path / "live.jsonl"
    rc, events, err = _run_json(capsys, ["run", "--camera", str(video_file), "--mic", str(question_clip), "--once",
                                         "--json", "--max-tokens", "16", "--file-speed", "3", "--log", str(log)])
    assert rc == 0, err
    assert all(set(e) == {"type", "t", "data"} for e in events)
    notices = _of(events, "notice")
    assert any("text-only" in n["message"] and "camera frames are ignored" in n["message"] for n in notices)
    final = _of(events, "transcript.final")[0]
    assert final["source"] == "speech"
    assert normalized_wer(QUESTION, final["text"]) <= 0.25, final["text"]
    assert _of(events, "transcript.partial")  # partial transcripts streamed while the clip played
    done = _of(events, "answer.done")[0]
    deltas = "".join(d["text"] for d in _of(events, "answer.delta"))
    assert done["text"].strip() and deltas == done["text"] and done["question"] == final["text"]
    t = _turn(events)
    for key in ("asr_final_s", "capture_to_vad_s", "endpoint_s", "prefill_s", "ttft_s", "decode_tok_s",
                "eos_to_first_token_s"):
        assert t[key] > 0, key
    assert "vision_s" not in t  # text-only: no image went anywhere
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["type"] for e in logged} >= {"timing", "transcript.final", "answer.done", "notice"}
    assert not {e["type"] for e in logged} & {"answer.delta", "transcript.partial"}


def test_run_once_on_a_file_without_speech_says_so(capsys, tmp_path, smollm2):
    import wave

    quiet = tmp_path / "quiet.wav"
    with wave.open(str(quiet), "wb") as w:  # 2 s of digital silence, 16 kHz mono
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 32000)
    rc, events, err = _run_json(capsys, ["run", "--camera", "none", "--mic", str(quiet), "--once", "--json",
                                         "--file-speed", "4"])
    assert rc == 0, err
    assert any(n["source"] == "microphone" and n["message"].endswith("no speech was heard in it")
               for n in _of(events, "notice"))
    assert not _of(events, "transcript.final") and not _of(events, "answer.done")


def test_run_once_vlm_uses_frame_and_survives_camera_end(capsys, question_clip, tiny_vlm_dir, tmp_path):
    short = write_video(tmp_path / "short.avi", photos=("astronaut",), seconds_each=0.5)  # ends mid-question
    rc, events, err = _run_json(capsys, ["run", "--camera", str(short), "--mic", str(question_clip), "--model",
                                         str(tiny_vlm_dir), "--once", "--json", "--max-tokens", "8",
                                         "--file-speed", "3"])
    assert rc == 0, err
    cam_errors = [d for d in _of(events, "error") if d["source"] == "camera"]
    assert cam_errors and "stopped delivering frames" in cam_errors[0]["message"] and cam_errors[0]["retry_in_s"] > 0
    final = _of(events, "transcript.final")[0]
    assert normalized_wer(QUESTION, final["text"]) <= 0.25, final["text"]
    assert _of(events, "answer.done")
    t = _turn(events)
    # the frame went to the encoder: while the question was spoken (speculation), or at the turn
    assert t["scene_changed"] and t["vision_s"] + t.get("spec_vision_s", 0) > 0 and t["image_tiles"] >= 1
    notices = [n["message"] for n in _of(events, "notice")]
    assert not any("text-only" in n for n in notices)
    # what the default vision precision, auto, runs: int8 on the CPU profile's onnxruntime (the tiny model passes
    # the int8 check), fp32 where the profile picks torch
    assert {"vision encoder: int8 on onnxruntime", "vision encoder: fp32 on torch"} & set(notices), notices


def test_ctrl_c_stops_within_a_second(question_clip, video_file, tiny_vlm_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "edge_mmm.cli", "run", "--camera", str(video_file), "--mic",
                             str(question_clip), "--model", str(tiny_vlm_dir), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # a test runner started as a background job ignores SIGINT, and children inherit
                            # that; give the CLI the disposition an interactive terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:  # wait until speech is being transcribed (models loaded, threads up)
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(json.loads(line)["type"])
            if seen[-1] == "transcript.partial":
                break
        assert "transcript.partial" in seen, (seen, proc.stderr.read() if proc.poll() is not None else "")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err
    # The runtime's threads stop at their next check (a Whisper pass already running finishes first, ~0.3 s on
    # a quiet 2-core CPU), then the process exits without the interpreter's slow teardown (cli.console_main):
    # 0.37 s measured on a quiet machine. The bound leaves room for a loaded CI machine and still catches a
    # regression to the old 1.9 s (teardown) or a hang. The measured time is printed for docs/live.md.
    print(f"SIGINT -> exit: {elapsed:.2f} s")
    assert elapsed < 1.5, f"took {elapsed:.2f} s to stop"


def test_no_inputs_says_what_to_pass(capsys, monkeypatch):
    import edge_mmm.runtime.inputs as inputs

    monkeypatch.setattr(inputs, "default_camera", lambda: None)
    monkeypatch.setattr(inputs, "default_microphone", lambda: (None, "PortAudio sees no input device"))
    rc = main(["run"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: no camera or microphone found") and "--mic" in err and "--camera" in err


def test_devices_list_inputs(capsys):
    rc = main(["devices", "--list-inputs", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out) == {"cameras", "camera_problem", "microphones", "microphone_problem"}
    if not list(Path("/dev").glob("video*")):
        assert out["cameras"] == [] and "/dev/video" in out["camera_problem"]
    try:
        import sounddevice as sd
        n_inputs = sum(d["max_input_channels"] > 0 for d in sd.query_devices())
    except (ImportError, OSError):
        n_inputs = 0
    assert len(out["microphones"]) == n_inputs
    assert (out["microphone_problem"] is None) == (n_inputs > 0)
    rc = main(["devices", "--list-inputs"])
    text = capsys.readouterr().out
    assert rc == 0 and "cameras (--camera):" in text and "microphones (--mic):" in text


def _capture_live_config(monkeypatch) -> dict:
    """Replace LiveAssistant: the CLI's LiveConfig lands in the returned dict (key "cfg") and the run stops
    with exit 2 and "captured the live config", before any model loads."""
    import edge_mmm.runtime.assistant as assistant
    from edge_mmm.errors import InputError

    seen = {}

    class Stop(InputError):
        pass

    def capture(cfg, speaker=None):
        seen["cfg"] = cfg
        raise Stop("captured the live config")

    monkeypatch.setattr(assistant, "LiveAssistant", capture)
    return seen


def test_run_vision_precision_reaches_the_live_config(capsys, monkeypatch, tiny_vlm_dir, question_clip):
    """`run --vision-precision int8` with a VLM: the live config asks load_vlm for the int8 encoder on
    onnxruntime (picked by the flag); with a torch --vlm-backend or a text-only model it is refused, exit 2.
    Without the flag it asks for auto; with --bundle auto (the bundle's own graphs) is taken, int8 refused."""
    seen = _capture_live_config(monkeypatch)
    base = ["run", "--camera", "none", "--mic", str(question_clip), "--model", str(tiny_vlm_dir)]
    assert main(base + ["--vision-precision", "int8"]) == 2
    assert "captured the live config" in capsys.readouterr().err
    assert seen["cfg"].vision_precision == "int8" and seen["cfg"].vlm_backend == "onnxruntime"
    seen.clear()
    assert main(base) == 2 and seen["cfg"].vision_precision == "auto"
    assert "captured the live config" in capsys.readouterr().err
    seen.clear()
    assert main(base + ["--vision-precision", "int8", "--vlm-backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "precision" in err and "onnxruntime" in err and not seen
    bundle = ["run", "--camera", "none", "--mic", str(question_clip), "--bundle", str(tiny_vlm_dir)]
    assert main(bundle + ["--vision-precision", "auto"]) == 2
    assert "captured the live config" in capsys.readouterr().err and seen["cfg"].bundle == tiny_vlm_dir
    seen.clear()
    assert main(bundle + ["--vision-precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--bundle" in err and len(err.strip().splitlines()) == 1 and not seen


def test_run_onnx_activations_reaches_the_live_config(capsys, monkeypatch, tiny_vlm_dir, question_clip):
    """`run --onnx-activations mixed` with the default text LM reaches LiveConfig.lm_activations (and the
    notice); an unknown mode, a torch LM backend, a VLM or a bundle are refused with one line, exit 2."""
    seen = _capture_live_config(monkeypatch)
    base = ["run", "--camera", "none", "--mic", str(question_clip)]
    assert main(base + ["--onnx-activations", "mixed"]) == 2
    assert "captured the live config" in capsys.readouterr().err
    assert seen["cfg"].lm_activations == "mixed" and seen["cfg"].lm_backend == "onnxruntime"
    seen.clear()
    assert main(base) == 2 and seen["cfg"].lm_activations == "fp32"  # the default: exact
    capsys.readouterr()
    for extra, words in ((["--onnx-activations", "int4"], "fp32, mixed, int8"),
                         (["--onnx-activations", "mixed", "--backend", "torch"], "onnxruntime LM backend"),
                         (["--onnx-activations", "mixed", "--model", str(tiny_vlm_dir)], "text-only LM"),
                         (["--onnx-activations", "mixed", "--bundle", str(tiny_vlm_dir)], "--bundle")):
        seen.clear()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and not seen, (extra, err)


def test_run_vlm_lm_backend_reaches_the_live_config(capsys, monkeypatch, tiny_vlm_dir, question_clip):
    """`run --vlm-lm-backend onnxruntime` with a VLM reaches LiveConfig.vlm_lm_backend; with the text-only
    default LM it is refused with one line, exit 2."""
    seen = _capture_live_config(monkeypatch)
    base = ["run", "--camera", "none", "--mic", str(question_clip), "--vlm-lm-backend", "onnxruntime"]
    assert main(base + ["--model", str(tiny_vlm_dir)]) == 2
    assert "captured the live config" in capsys.readouterr().err
    assert seen["cfg"].vlm_lm_backend == "onnxruntime"
    seen.clear()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "needs a VLM" in err and len(err.strip().splitlines()) == 1 and not seen


def test_the_executable_flushes_its_output_before_its_fast_exit():
    """`console_main` leaves with os._exit (no interpreter teardown); output to a pipe is block-buffered, so it
    must be flushed first or it is lost (PYTHONUNBUFFERED, if set here, would hide that)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = subprocess.run([sys.executable, "-m", "edge_mmm.cli", "devices"], capture_output=True, text=True,
                         timeout=120, env=env)  # its table is printed without a flush of its own
    assert out.returncode == 0, out.stderr
    assert "orin-nano-8gb" in out.stdout and out.stdout.endswith("\n")


def test_run_early_endpoint_reaches_the_live_config(capsys, monkeypatch, question_clip):
    """The early endpoint is on by default (300 ms), `--sentence-end-silence-ms 0` turns it off, another value
    sets it, and a value under 60 ms is refused with one line, exit 2."""
    seen = _capture_live_config(monkeypatch)
    base = ["run", "--camera", "none", "--mic", str(question_clip)]
    for extra, want in (([], 300), (["--sentence-end-silence-ms", "0"], None), (["--sentence-end-silence-ms", "200"], 200)):
        seen.clear()
        assert main(base + extra) == 2 and "captured the live config" in capsys.readouterr().err
        assert seen["cfg"].sentence_end_silence_ms == want, extra
    seen.clear()
    assert main(base + ["--sentence-end-silence-ms", "20"]) == 2
    err = capsys.readouterr().err
    assert "sentence_end_silence_ms" in err and len(err.strip().splitlines()) == 1 and not seen
