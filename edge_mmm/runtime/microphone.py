"""Live audio in: a 16 kHz ring buffer fed by a microphone (sounddevice / PortAudio) or an audio file
played in real time.

The ring never blocks its writer (the PortAudio callback must return quickly). If the reader falls more
than `capacity_s` behind, the oldest unread samples are overwritten: that loss is counted in
`overflow_samples` and handed to the reader by `take_overflow()` so it is reported, never silent.
Driver-side losses (PortAudio's input-overflow flag) are counted separately by `MicrophoneSource`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.audio.io import StreamResampler
from edge_mmm.errors import InputError, require
from edge_mmm.runtime.retry import Backoff, SourceThread, run_with_retry

ErrorCallback = Callable[[str, float], None]  # (message, retry_in_s)


class AudioRing:
    """Single-reader ring of 16 kHz float32 samples with capture times and an end-of-stream mark."""

    def __init__(self, capacity_s: float = 60.0):
        if capacity_s <= 0:
            raise InputError(f"AudioRing capacity_s must be > 0, got {capacity_s}")
        self.capacity = int(capacity_s * SAMPLE_RATE)
        self._buf = np.zeros(self.capacity, np.float32)
        self._cond = threading.Condition()
        self.written = 0  # absolute index of the next sample to write
        self.read_pos = 0  # absolute index of the next sample to read
        self.overflow_samples = 0  # total samples lost because the reader was too far behind
        self._overflow_unreported = 0
        self._eos = False
        self._times: "deque[Tuple[int, float]]" = deque(maxlen=4096)  # (absolute end index, capture time)
        self.gate: Optional[Callable[[np.ndarray, float], np.ndarray]] = None  # (samples, t) -> samples: echo gate

    def write(self, samples: np.ndarray, t: Optional[float] = None) -> None:
        """Append samples captured at monotonic time `t` (default: now, i.e. the block's last sample)."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if x.size == 0:
            return
        t = time.monotonic() if t is None else t
        if self.gate is not None:
            x = self.gate(x, t)
        with self._cond:
            if x.size > self.capacity:  # only the newest `capacity` samples fit; the rest count as lost below
                self.written += x.size - self.capacity
                x = x[-self.capacity:]
            start = self.written % self.capacity
            first = min(x.size, self.capacity - start)
            self._buf[start:start + first] = x[:first]
            self._buf[:x.size - first] = x[first:]
            self.written += x.size
            if self.written - self.read_pos > self.capacity:
                lost = self.written - self.capacity - self.read_pos
                self.read_pos += lost
                self._lose(lost)
            self._times.append((self.written, t))
            self._cond.notify_all()

    def _lose(self, n: int) -> None:
        self.overflow_samples += n
        self._overflow_unreported += n

    def mark_end(self) -> None:
        """The source ended: a reader that drains the ring is told so once (to close an open utterance)."""
        with self._cond:
            self._eos = True
            self._cond.notify_all()

    def read(self, max_samples: int, timeout: float) -> Tuple[np.ndarray, int, bool]:
        """(samples, absolute index of the first, end_of_stream). Waits up to `timeout` for data."""
        with self._cond:
            if self.written == self.read_pos and not self._eos:
                self._cond.wait(timeout)
            n = min(self.written - self.read_pos, max_samples)
            start = self.read_pos % self.capacity
            first = min(n, self.capacity - start)
            out = np.concatenate([self._buf[start:start + first], self._buf[:n - first]])
            pos = self.read_pos
            self.read_pos += n
            eos = self._eos and self.read_pos == self.written
            if eos:
                self._eos = False
            return out, pos, eos

    def take_overflow(self) -> int:
        """Samples lost to overflow since the last call (the reader reports them)."""
        with self._cond:
            n, self._overflow_unreported = self._overflow_unreported, 0
            return n

    def capture_time(self, index: int) -> Optional[float]:
        """Monotonic capture time of absolute sample `index` (None when it was not written yet)."""
        best = None
        with self._cond:
            for end, t in reversed(self._times):  # newest first; stop before the write that ends at/below it
                if end <= index:
                    break
                best = t - (end - 1 - index) / SAMPLE_RATE
        return best


def parse_mic_source(src: str) -> Union[Path, int, str]:
    """An existing file -> Path; digits -> a sounddevice device index; else a device name (substring)."""
    if not src or not src.strip():
        raise InputError("--mic is empty; pass a device index or name (edge-mmm devices --list-inputs) or an audio file")
    p = Path(src).expanduser()
    if p.is_file():
        return p
    if src.strip().isdigit():
        return int(src)
    if p.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus") or "/" in src:
        raise InputError(f"--mic {src}: no such audio file")
    return src


class MicrophoneSource(SourceThread):
    """A sounddevice input stream writing into an `AudioRing`; reopened with backoff when it fails."""

    thread_name = "edge-mmm-mic"

    def __init__(self, device: Union[int, str, None], ring: AudioRing, on_error: ErrorCallback,
                 backoff: Optional[Backoff] = None, block_s: float = 0.032):
        super().__init__()
        self.device = device
        self.ring = ring
        self.on_error = on_error
        self.backoff = backoff or Backoff()
        self.block_s = block_s
        self.driver_overflows = 0  # callbacks flagged input_overflow by PortAudio (audio lost in the driver)
        self.callbacks = 0
        self.opened = 0  # successful opens
        self._resample: Optional[StreamResampler] = None
        self._sd = require("sounddevice", "audio", "microphone input")

    def callback(self, indata, frames, time_info, status) -> None:
        """PortAudio callback: copy the block (mono) into the ring; count driver overflows."""
        self.callbacks += 1
        if status and status.input_overflow:
            self.driver_overflows += 1
        x = np.asarray(indata, dtype=np.float32)
        x = x[:, 0] if x.ndim == 2 else x.reshape(-1)
        self.ring.write(self._resample(x) if self._resample is not None else x.copy())

    def open_stream(self):
        """An input stream at 16 kHz, or at the device's own rate with resampling when 16 kHz is refused."""
        sd = self._sd
        try:
            self._resample = None
            return sd.InputStream(device=self.device, channels=1, samplerate=SAMPLE_RATE, dtype="float32",
                                  blocksize=int(SAMPLE_RATE * self.block_s), callback=self.callback)
        except sd.PortAudioError as exc:
            if "sample rate" not in str(exc).lower():
                raise
        rate = int(sd.query_devices(self.device, "input")["default_samplerate"])
        self._resample = StreamResampler(rate)
        return sd.InputStream(device=self.device, channels=1, samplerate=rate, dtype="float32",
                              blocksize=int(rate * self.block_s), callback=self.callback)

    def _attempt(self) -> bool:
        start_callbacks, reported = self.callbacks, self.driver_overflows
        with self.open_stream() as stream:
            self.opened += 1
            while not self.stopping.wait(0.1):
                if self.driver_overflows != reported:
                    self.on_error(f"microphone overflow: PortAudio lost audio in {self.driver_overflows - reported} "
                                  f"block(s)", 0.0)
                    reported = self.driver_overflows
                if not stream.active:
                    raise RuntimeError("the input stream stopped (device unplugged?)")
        return self.callbacks > start_callbacks

    def run(self) -> None:
        run_with_retry(self._attempt, self.stopping, self.backoff, self.on_error)


class AudioFileSource(SourceThread):
    """An audio file decoded once and written to the ring in real time (`speed` x), then end-of-stream."""

    thread_name = "edge-mmm-audio-file"

    def __init__(self, path: Union[str, Path], ring: AudioRing, speed: float = 1.0, block_s: float = 0.032):
        from edge_mmm.audio.io import load_audio

        super().__init__()
        if speed <= 0:
            raise InputError(f"audio file speed must be > 0, got {speed}")
        self.path = Path(path)
        self.audio = load_audio(self.path)
        self.ring = ring
        self.speed = speed
        self.block = int(SAMPLE_RATE * block_s)
        self.finished = threading.Event()

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE

    def run(self) -> None:
        t0 = time.monotonic()
        for i in range(0, self.audio.size, self.block):
            end = min(i + self.block, self.audio.size)
            due = t0 + end / SAMPLE_RATE / self.speed  # a block is available once its last sample "happened"
            if self.stopping.wait(max(0.0, due - time.monotonic())):
                return
            self.ring.write(self.audio[i:end])
        self.ring.mark_end()
        self.finished.set()
