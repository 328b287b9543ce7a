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
