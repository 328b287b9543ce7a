"""Silero VAD with onnxruntime: a streaming speech start/end detector and a whole-clip segmenter.

The ONNX model ships inside the `silero-vad` package; only the file is used (no torch at runtime).
The segmentation rules follow the package's `get_speech_timestamps`: hysteresis between `threshold`
and `neg_threshold`, a speech segment ends after `min_silence_ms` below `neg_threshold`, segments no
longer than `min_speech_ms` are dropped, and each kept segment is padded by `speech_pad_ms`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.errors import InputError, MissingExtraError, ModelFileError
from edge_mmm.runners.ort_session import ort_session

VAD_CHUNK = 512  # samples per model call at 16 kHz (32 ms)
VAD_CONTEXT = 64  # samples of the previous chunk the model sees in front of each chunk
VAD_STATE_SHAPE = (2, 1, 128)


@dataclass
class VadOptions:
    """Segmentation settings (the silero-vad defaults)."""

    threshold: float = 0.5
    neg_threshold: Optional[float] = None  # None: max(threshold - 0.15, 0.01), as silero-vad
    min_silence_ms: int = 100
    speech_pad_ms: int = 30
    min_speech_ms: int = 250

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"VadOptions.threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is None:
            self.neg_threshold = max(self.threshold - 0.15, 0.01)
        if not 0.0 < self.neg_threshold <= self.threshold:
            raise InputError(f"VadOptions.neg_threshold must be in (0, threshold], got {self.neg_threshold}")
        for name in ("min_silence_ms", "speech_pad_ms", "min_speech_ms"):
            if getattr(self, name) < 0:
                raise InputError(f"VadOptions.{name} must be >= 0, got {getattr(self, name)}")
        # A streamed end event carries its padding before the next start is known; with this bound the
        # padded segments never overlap, so stream and batch agree.
        if 2 * self.speech_pad_ms > self.min_silence_ms:
            raise InputError(f"VadOptions.speech_pad_ms ({self.speech_pad_ms}) must be at most half of "
                             f"min_silence_ms ({self.min_silence_ms})")


@dataclass(frozen=True)
class VadEvent:
    """Speech started or ended at `sample` (padded, in samples of the stream at 16 kHz)."""

    kind: str  # "start" | "end"
    sample: int

    @property
    def time_s(self) -> float:
        return self.sample / SAMPLE_RATE


def default_vad_model() -> Path:
    """The Silero VAD ONNX file shipped by the `silero-vad` package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise MissingExtraError("silero_vad", "audio", "voice activity detection")
    path = Path(spec.origin).parent / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise ModelFileError(f"Silero VAD model not found in the silero-vad package: {path}")
    return path


class SileroVad:
    """The Silero VAD network: speech probability of each 512-sample chunk; keeps its recurrent state."""

    def __init__(self, path: Union[str, Path, None] = None):
        self.path = Path(path) if path is not None else default_vad_model()
        # ~0.2 ms a chunk on one thread; more threads only add overhead
        self.session = ort_session(self.path, "Silero VAD model", threads=1, inputs=["input", "state", "sr"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros(VAD_STATE_SHAPE, np.float32)
        self._context = np.zeros(VAD_CONTEXT, np.float32)

    def __call__(self, chunk: np.ndarray) -> float:
        """Speech probability of one chunk of exactly VAD_CHUNK float32 samples."""
        if chunk.shape != (VAD_CHUNK,):
            raise InputError(f"VAD chunk must have {VAD_CHUNK} samples, got shape {chunk.shape}")
        x = np.concatenate([self._context, chunk.astype(np.float32, copy=False)])[None, :]
        prob, self._state = self.session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = x[0, -VAD_CONTEXT:]
        return float(prob[0, 0])


class VADIterator:
    """Streaming segmenter: `feed()` any number of 16 kHz samples, get the start/end events they complete.

    A start is reported once the speech has lasted more than `min_speech_ms` (so a click that the batch
    segmenter would drop never starts a turn); its sample is the true, padded start. `flush()` ends the
    stream: it runs the partial last chunk (zero-padded) and closes an open segment at the stream's end (as
    `get_speech_timestamps` does), or with `at_pause` and a silence begun, where that silence began (plus the
    end padding), as `min_silence_ms` more of it would (the live segmenter: a file that stops in a pause).
    """

    def __init__(self, options: Optional[VadOptions] = None, model: Optional[SileroVad] = None):
        self.options = options or VadOptions()
        self.model = model or SileroVad()
        o = self.options
        self._min_silence = SAMPLE_RATE * o.min_silence_ms / 1000
        self._min_speech = SAMPLE_RATE * o.min_speech_ms / 1000
        self._pad = int(SAMPLE_RATE * o.speech_pad_ms / 1000)
        self.reset()

    def reset(self) -> None:
        self.model.reset()
        self._pending = np.zeros(0, np.float32)
        self.n_samples = 0  # samples fed so far
        self._chunk_start = 0  # first sample of the next chunk the model sees
        self.triggered = False  # inside a speech segment (hysteresis state)
        self.started = False  # that segment's start event was emitted
        self._start = 0
        self._temp_end = 0
        self.last_prob = 0.0

    @property
    def in_speech(self) -> bool:
        """True between an emitted start and its end."""
        return self.started

    @property
    def silence_from(self) -> Optional[int]:
        """Inside speech: the first sample of the silence now going on (the speech ends there if it lasts
        `min_silence_ms`), else None."""
        return self._temp_end if self.started and self._temp_end else None

    @property
    def pending_start(self) -> Optional[int]:
        """Speech heard but not yet reported (shorter than `min_speech_ms` so far): its first voiced sample,
        else None. A start event for it, if one comes, is dated there (less the padding)."""
        return self._start if self.triggered and not self.started else None

    def feed(self, audio: np.ndarray) -> List[VadEvent]:
        """Push samples (any length); return the events completed by them, in order."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.n_samples += audio.shape[0]
        buf = np.concatenate([self._pending, audio]) if self._pending.size else audio
        events: List[VadEvent] = []
        n_full = buf.shape[0] // VAD_CHUNK
        for i in range(n_full):
            events += self._step(buf[i * VAD_CHUNK:(i + 1) * VAD_CHUNK])
        self._pending = buf[n_full * VAD_CHUNK:].copy()
        return events

    def flush(self, at_pause: bool = False) -> List[VadEvent]:
        """End of stream: process the partial chunk and close an open segment (see the class docstring)."""
        events: List[VadEvent] = []
        paused = self._temp_end if self.triggered else 0  # not the zero-padded last chunk's "silence"
        if self._pending.size:
            chunk = np.zeros(VAD_CHUNK, np.float32)
            chunk[:self._pending.size] = self._pending
            self._pending = np.zeros(0, np.float32)
            events += self._step(chunk)
        if at_pause and self.triggered and paused and self._temp_end == paused:
            # a pause was going on: the speech ended where it began, as a live endpoint would have said
            # (so a pass already run over the pause's audio is the final one)
            return events + self._close(self._temp_end)
        if self.triggered and self.n_samples - self._start > self._min_speech:
            if not self.started:
                events.append(VadEvent("start", max(0, self._start - self._pad)))
            events.append(VadEvent("end", self.n_samples))
        self.triggered = self.started = False
        self._temp_end = 0
        return events

    def end_pause(self) -> List[VadEvent]:
        """End the speech segment now if a silence is going on in it, where that silence began (plus the end
        padding), as `min_silence_ms` more of it would: an endpoint that decided sooner (a complete sentence).
        No events when there is no such silence."""
        if not (self.started and self._temp_end):
            return []
        return self._close(self._temp_end)

    def _step(self, chunk: np.ndarray) -> List[VadEvent]:
        o = self.options
        cur = self._chunk_start
        self._chunk_start += VAD_CHUNK
        prob = self.last_prob = self.model(chunk)
        if prob >= o.threshold:
            self._temp_end = 0
            if not self.triggered:
                self.triggered, self.started, self._start = True, False, cur
                return []
        if not self.triggered:
            return []
        if prob < o.neg_threshold:
            if not self._temp_end:
                self._temp_end = cur
            if cur - self._temp_end >= self._min_silence:
                return self._close(self._temp_end)
        extent = self._temp_end or cur  # where the speech ends if the silence now going on lasts
        if not self.started and extent - self._start > self._min_speech:
            self.started = True
            return [VadEvent("start", max(0, self._start - self._pad))]
        return []

    def _close(self, end: int) -> List[VadEvent]:
        events = []
        if end - self._start > self._min_speech:
            if not self.started:
                events.append(VadEvent("start", max(0, self._start - self._pad)))
            # The end padding may run past the samples fed so far; a live caller waits for them.
            events.append(VadEvent("end", end + self._pad))
        self.triggered = self.started = False
        self._temp_end = 0
        return events


def events_to_segments(events: List[VadEvent], n_samples: int) -> List[Tuple[float, float]]:
    """Pair start/end events into (start_s, end_s), clipping the end padding to the audio length."""
    segments, start = [], None
    for ev in events:
        if ev.kind == "start":
            start = ev.sample
        elif start is not None:
            segments.append((start / SAMPLE_RATE, min(ev.sample, n_samples) / SAMPLE_RATE))
            start = None
    return segments


def speech_segments(audio: np.ndarray, options: Optional[VadOptions] = None,
                    model: Optional[SileroVad] = None) -> List[Tuple[float, float]]:
    """Speech segments of a whole 16 kHz mono clip as (start_s, end_s), in order."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise InputError(f"speech_segments: expected mono audio (1-D array), got shape {audio.shape}")
    it = VADIterator(options, model)
    events = it.feed(audio) + it.flush()
    return events_to_segments(events, audio.shape[0])
