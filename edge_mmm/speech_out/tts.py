"""Text-to-speech engines. One small interface (`TtsEngine`); espeak-ng is the embedded default.

An engine turns one sentence into float32 mono samples at its `sample_rate`; `cancel()` (from another
thread) ends a synthesis in progress, which then returns an empty array.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from edge_mmm.errors import DeviceError, InputError

ESPEAK_RATE = 22050  # espeak-ng's output rate (every voice)


class TtsEngine(Protocol):
    sample_rate: int

    def synthesize(self, text: str) -> np.ndarray:
        """One sentence -> float32 mono samples in [-1, 1] at `sample_rate` (empty when cancelled)."""

    def cancel(self) -> None:
        """End a synthesis running in another thread."""


@dataclass
class EspeakConfig:
    voice: str = "en-us"
    speed: int = 175  # words per minute
    pitch: int = 50  # 0-99

    def __post_init__(self):
        if not 80 <= self.speed <= 450:
            raise InputError(f"espeak-ng speed must be 80-450 words per minute, got {self.speed}")
        if not 0 <= self.pitch <= 99:
            raise InputError(f"espeak-ng pitch must be 0-99, got {self.pitch}")
        if not self.voice or self.voice.startswith("-"):
            raise InputError(f"bad espeak-ng voice {self.voice!r}")


def wav_samples(data: bytes) -> "tuple[np.ndarray, int]":
    """16-bit PCM WAV bytes (espeak-ng --stdout: its sizes are placeholders) -> (float32 samples, rate)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError("text-to-speech output is not a WAV stream")
    pos, rate, bits = 12, None, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if tag == b"fmt ":
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
        elif tag == b"data":
            if rate is None or bits != 16:
                raise InputError(f"text-to-speech WAV must be 16-bit PCM after a fmt chunk, got {bits} bits")
            pcm = data[body:]  # streamed WAV: the data size field is not the real length
            pcm = pcm[:len(pcm) // 2 * 2]
            return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0, rate
        pos = body + size + (size & 1)
    raise InputError("text-to-speech WAV has no data chunk")


class EspeakTts:
    """espeak-ng as a subprocess writing a WAV to its stdout (no temporary files)."""

    sample_rate = ESPEAK_RATE

    def __init__(self, config: Optional[EspeakConfig] = None):
        self.config = config or EspeakConfig()
        self._exe = shutil.which("espeak-ng")
        if self._exe is None:
            # a system package, not a pip extra
            raise DeviceError("espeak-ng is not installed (needed for spoken answers); on Debian: apt-get install "
                              "espeak-ng")
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._cancelled = False
        probe = subprocess.run([self._exe, "-v", self.config.voice, "-q", "."], capture_output=True, check=False)
        if probe.returncode != 0:  # checked now: an unknown voice must not fail sentence by sentence later
            raise InputError(f"espeak-ng voice {self.config.voice!r} does not exist (espeak-ng --voices lists them)")

    def synthesize(self, text: str) -> np.ndarray:
        text = text.strip()
        if not text:
            return np.zeros(0, np.float32)
        c = self.config
        # the text goes through stdin: a sentence starting with "-" is never read as an option
        cmd = [self._exe, "-v", c.voice, "-s", str(c.speed), "-p", str(c.pitch), "--stdout"]
        with self._lock:
            self._cancelled = False
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE)
            proc = self._proc
        try:
            out, err = proc.communicate(text.encode("utf-8"))
        finally:
            with self._lock:
                self._proc = None
                cancelled = self._cancelled
        if cancelled:
            return np.zeros(0, np.float32)
        if proc.returncode != 0:
            raise InputError(f"espeak-ng failed ({proc.returncode}): {err.decode(errors='replace').strip()[:200]}")
        samples, rate = wav_samples(out)
        if rate != self.sample_rate:
            raise InputError(f"espeak-ng wrote {rate} Hz, expected {self.sample_rate}")
        return samples

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
