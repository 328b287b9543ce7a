"""Where spoken audio goes: a `PlaybackBuffer` the speaker fills and a sink drains in real time.

A sink pulls fixed blocks from the buffer with the time the block's first sample leaves the device (a
PortAudio output callback: the DAC time it reports; a paced sink: the pull time). The buffer turns that
into the play time of the first sample of each tagged clip (a turn's "first audio out"), keeps the recent
playback level for the echo gate, and `clear()` (barge-in) empties it: the next block pulled is silence.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

import numpy as np

from edge_mmm.errors import DeviceError, InputError, require

LEVEL_HISTORY = 256  # played blocks remembered for the echo gate (5 s of 20 ms blocks)


class PlaybackBuffer:
    """Thread-safe FIFO of float32 samples in tagged clips; `pull` never blocks (silence when empty)."""

    def __init__(self, sample_rate: int):
        if sample_rate <= 0:
            raise InputError(f"playback sample_rate must be > 0, got {sample_rate}")
        self.sample_rate = sample_rate
        self._lock = threading.Lock()
        self._clips: Deque[Tuple[np.ndarray, Any]] = deque()
        self._offset = 0  # samples of the first clip already played
        self._started: Deque[Any] = deque(maxlen=16)  # tags whose first sample was played
        self.started: "queue.SimpleQueue[Tuple[Any, float]]" = queue.SimpleQueue()  # (tag, play time)
        self._levels: Deque[Tuple[float, float]] = deque(maxlen=LEVEL_HISTORY)  # (block play time, RMS)
        self.last_audio_t: Optional[float] = None  # play time of the end of the newest audible block
        self.last_write_t: Optional[float] = None  # when a sink last took audible samples (monotonic)
        self._listeners: List[Callable[[np.ndarray, float], None]] = []  # (block, play time) of every pull

    def add_listener(self, listener: Callable[[np.ndarray, float], None]) -> None:
        """Call `listener(block, t_out)` with every block a sink pulls, silence included (the echo reference
        of `speech_out.aec`); it runs on the sink's thread, so it must be quick."""
        self._listeners.append(listener)

    def push(self, samples: np.ndarray, tag: Any = None) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        if x.size:
            with self._lock:
                self._clips.append((x, tag))

    def pending(self) -> int:
        """Samples waiting to be played."""
        with self._lock:
            return sum(c.size for c, _ in self._clips) - self._offset

    def clear(self) -> Tuple[float, int]:
        """Drop everything not yet played; returns (monotonic time of the clear, samples dropped)."""
        with self._lock:
            dropped = sum(c.size for c, _ in self._clips) - self._offset
            self._clips.clear()
            self._offset = 0
            return time.monotonic(), dropped

    def pull(self, n: int, t_out: float) -> Tuple[np.ndarray, bool]:
        """The next `n` samples (zero-padded) and whether any were audio; `t_out`: when the first is heard."""
        out = np.zeros(n, np.float32)
        filled = 0
        with self._lock:
            while filled < n and self._clips:
                clip, tag = self._clips[0]
                if self._offset == 0 and tag is not None and tag not in self._started:
                    self._started.append(tag)
                    self.started.put((tag, t_out + filled / self.sample_rate))
                take = min(n - filled, clip.size - self._offset)
                out[filled:filled + take] = clip[self._offset:self._offset + take]
                filled += take
                self._offset += take
                if self._offset == clip.size:
                    self._clips.popleft()
                    self._offset = 0
            if filled:
                self._levels.append((t_out, float(np.sqrt(np.mean(out[:filled] ** 2)))))
                self.last_audio_t = t_out + filled / self.sample_rate
                self.last_write_t = time.monotonic()
        for listener in self._listeners:
            listener(out, t_out)
        return out, filled > 0

    def level(self, t: float, window_s: float) -> float:
        """Loudest RMS of the blocks played from `t - window_s` on (0.0 when none)."""
        with self._lock:
            return max((rms for tb, rms in self._levels if tb >= t - window_s), default=0.0)


class PacedSink:
    """Drains the buffer in real time from a thread, handing each audible block to `deliver(block, t)`.

    The sink of tests (`RecordingSink`) and of the demo page (blocks go to the browser)."""

    def __init__(self, deliver: Optional[Callable[[np.ndarray, float], None]] = None, block_s: float = 0.02):
        if not 0.005 <= block_s <= 0.2:
            raise InputError(f"sink block_s must be 0.005-0.2 s, got {block_s}")
        self.block_s = block_s
        self.deliver = deliver
        self._stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def start(self, buffer: PlaybackBuffer) -> None:
        n = max(1, int(round(buffer.sample_rate * self.block_s)))
        self.thread = threading.Thread(target=self._run, args=(buffer, n), name="edge-mmm-playback", daemon=True)
        self.thread.start()

    def _run(self, buffer: PlaybackBuffer, n: int) -> None:
        period = n / buffer.sample_rate
        next_t = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if next_t > now:
                self._stop.wait(next_t - now)
                continue
            if now - next_t > 0.5:  # stalled (a loaded machine): resume from now instead of bursting
                next_t = now
            block, audible = buffer.pull(n, next_t)
            if audible and self.deliver is not None:
                self.deliver(block, next_t)
            next_t += period

    def close(self, timeout: float = 1.0) -> bool:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True


class RecordingSink(PacedSink):
    """A paced sink that keeps every audible block with the time it was taken: what tests measure."""

    def __init__(self, block_s: float = 0.02):
        super().__init__(self._record, block_s)
        self.blocks: List[Tuple[float, np.ndarray]] = []  # (monotonic time the block was written, samples)
        self._lock = threading.Lock()

    def _record(self, block: np.ndarray, t: float) -> None:
        with self._lock:
            self.blocks.append((time.monotonic(), block.copy()))

    def audio(self) -> np.ndarray:
        with self._lock:
            return np.concatenate([b for _, b in self.blocks]) if self.blocks else np.zeros(0, np.float32)

    def last_write_t(self) -> Optional[float]:
        with self._lock:
            return self.blocks[-1][0] if self.blocks else None


class SoundDeviceSink:
    """A PortAudio output stream (sounddevice, imported when opened) whose callback drains the buffer.

    A block is due when the one before it has played: the callback keeps that time (`_due`). A stream that
    asks for blocks more than `max_run_ahead_s` before they are due is not playing them: after an underrun
    the ALSA `pulse` plugin called the callback for 7.9 s of audio within 0.5 s and never played it (the
    microphone of a loopback heard the answer go on 7.9 s later in its text). Such blocks get silence and the
    answer stays in the buffer (counted in `run_ahead_blocks`), so no part of it is skipped unheard and the
    echo canceller is not handed seconds of reference that were never heard."""

    def __init__(self, device=None, block_s: float = 0.02, max_run_ahead_s: float = 0.3):
        if max_run_ahead_s <= 0:
            raise InputError(f"max_run_ahead_s must be > 0, got {max_run_ahead_s}")
        self.device = device
        self.block_s = block_s
        self.max_run_ahead_s = max_run_ahead_s
        self.stream = None
        self.underflows = 0
        self.run_ahead_blocks = 0  # blocks asked for too early: given silence, nothing taken from the buffer
        self.thread = None  # PortAudio owns the callback thread
        self._due: Optional[float] = None  # when the next block's first sample is due to be heard

    def fill(self, buffer: PlaybackBuffer, outdata: np.ndarray, frames: int, heard_t: float) -> None:
        """Fill `outdata` (frames x 1) with the next block, reported to be heard from `heard_t` (monotonic)."""
        if self._due is not None and self._due - heard_t > self.max_run_ahead_s:
            outdata[:, 0] = 0.0
            self.run_ahead_blocks += 1
            return
        block, _ = buffer.pull(frames, heard_t)
        outdata[:, 0] = block
        # back-to-back callbacks are normal (the device takes two blocks at once): the second is due after the
        # first; a stall (an underrun) restarts the count from the reported time
        self._due = (heard_t if self._due is None else max(heard_t, self._due)) + frames / buffer.sample_rate

    def start(self, buffer: PlaybackBuffer) -> None:
        sd = require("sounddevice", "audio", "spoken answers through PortAudio")
        self._due = None

        def callback(outdata, frames, time_info, status):
            if status and status.output_underflow:
                self.underflows += 1
            # the DAC time of this block's first sample, in the stream's clock, mapped onto ours
            ahead = time_info.outputBufferDacTime - time_info.currentTime if time_info.currentTime else 0.0
            self.fill(buffer, outdata, frames, time.monotonic() + max(0.0, min(ahead, 1.0)))

        try:
            self.stream = sd.OutputStream(device=self.device, channels=1, samplerate=buffer.sample_rate,
                                          dtype="float32", blocksize=int(buffer.sample_rate * self.block_s),
                                          latency="low", callback=callback)
            self.stream.start()
        except sd.PortAudioError as exc:
            raise DeviceError(f"cannot open audio output {self.device if self.device is not None else 'default'}: "
                              f"{exc} (edge-mmm devices --list-inputs lists PortAudio devices)") from exc

    def close(self, timeout: float = 1.0) -> bool:
        if self.stream is not None:
            self.stream.stop()
            self.stream.close()
            self.stream = None
        return True
