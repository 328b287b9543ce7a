"""Small media files made at test time for the untrusted-media tests (no ffmpeg binary needed: PyAV encodes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest


def tone_mp3(out: Path, seconds: float = 3.0, rate: int = 16000) -> Path:
    """A 440 Hz tone as MP3, encoded with PyAV's bundled FFmpeg (what a server's own media file could be)."""
    t = np.arange(int(seconds * rate)) / rate
    frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                       format="flt", layout="mono")
    frame.sample_rate = rate
    with av.open(str(out), "w") as container:
        stream = container.add_stream("mp3", rate=rate)
        stream.layout = "mono"
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    return out


def silence_flac(out: Path, seconds: int) -> Path:
    """`seconds` of silence as FLAC (sox, which the README installs): a few KB that decode to seconds * 8000
    samples, the shape of a decompression-style audio bomb."""
    if shutil.which("sox") is None:
        pytest.skip("sox not installed (the README's apt line installs it)")
    subprocess.run(["sox", "-D", "-n", "-r", "8000", "-c", "1", "-b", "16", str(out), "trim", "0", str(seconds)],
                   check=True, capture_output=True)
    return out


def continued_question(out: Path, first: str = "What is the capital of France?",
                       rest: str = "And what about Germany?", gap_s: float = 0.4) -> Path:
    """Two spoken parts (espeak-ng) as one 16 kHz WAV: `first` after 0.8 s of silence, espeak-ng's own ~0.3 s
    tail + `gap_s` of silence, then `rest` and 1.5 s of silence: a question the speaker goes on with."""
    import wave

    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    a = load_audio(synthesize(first, out.with_suffix(".a.wav"), lead_silence=0.8))
    b = load_audio(synthesize(rest, out.with_suffix(".b.wav"), trail_silence=1.5))
    x = np.concatenate([a, np.zeros(int(gap_s * 16000), np.float32), b])
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return out
