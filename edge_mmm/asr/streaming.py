"""Streaming Whisper: re-transcribe the growing utterance and commit words with LocalAgreement-2.

As in whisper_streaming (Machacek et al., 2023): a word is committed once two consecutive hypotheses
agree on it and on every word before it. Committed text only grows; the uncommitted tail is shown as
tentative. Each hypothesis transcribes the whole utterance from its start, so an utterance is bounded
by Whisper's 30 s window (`max_utterance_s`, after which it is finalized and a new one begins).

`StreamingTranscriber` handles one utterance; `VadTranscriber` cuts a continuous stream into utterances
with Silero VAD and drives it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional

import numpy as np

from edge_mmm.asr.transcribe import TranscribeOptions
from edge_mmm.audio.constants import CHUNK_LENGTH, MIN_AUDIO_SECONDS, SAMPLE_RATE
from edge_mmm.audio.vad import SileroVad, VADIterator, VadOptions
from edge_mmm.errors import InputError


@dataclass
class StreamingOptions:
    """When to re-transcribe and how to decode (greedy, no temperature fallback, by default)."""

    min_chunk_s: float = 1.0  # new audio needed before the next hypothesis
    max_utterance_s: float = CHUNK_LENGTH - 2.0  # finalize before the buffer outgrows one Whisper window
    transcribe: TranscribeOptions = field(default_factory=lambda: TranscribeOptions(temperatures=(0.0,)))

    def __post_init__(self):
        if self.min_chunk_s <= 0:
            raise InputError(f"StreamingOptions.min_chunk_s must be > 0, got {self.min_chunk_s}")
        if not MIN_AUDIO_SECONDS < self.max_utterance_s <= CHUNK_LENGTH:
            raise InputError(f"StreamingOptions.max_utterance_s must be in ({MIN_AUDIO_SECONDS}, {CHUNK_LENGTH}], "
                             f"got {self.max_utterance_s}")


@dataclass
class TranscriptEvent:
    """A partial (text may still change after `committed`) or final transcript of one utterance."""

    kind: str  # "partial" | "final"
    committed: str  # agreed text; later events of the utterance only append to it
    tentative: str  # the latest hypothesis after the committed words ("" in a final event)
    audio_s: float  # utterance audio transcribed so far
    asr_s: float  # seconds the transcription behind this event took
    start_s: float = 0.0  # utterance start in the stream (VadTranscriber), else 0

    @property
    def text(self) -> str:
        return " ".join(t for t in (self.committed, self.tentative) if t)


def _norm(word: str) -> str:
    # Hypotheses of a growing buffer differ in case and punctuation ("degrees" -> "degrees,").
    return re.sub(r"[^\w']", "", word.lower())


def common_prefix_len(a: List[str], b: List[str]) -> int:
    """Number of leading words on which two hypotheses agree (case and punctuation ignored)."""
    n = 0
    for x, y in zip(a, b):
        if _norm(x) != _norm(y):
            break
        n += 1
    return n


class StreamingTranscriber:
    """One utterance: `feed()` audio, get partial events; `finalize()` returns the final event."""

    def __init__(self, asr, options: Optional[StreamingOptions] = None):
        self.asr = asr
        self.options = options or StreamingOptions()
        self.reset()

    def reset(self) -> None:
        self._chunks: List[np.ndarray] = []
        self.n_samples = 0
        self._last_run = 0  # n_samples at the last hypothesis
        self.committed: List[str] = []
        self._prev: Optional[List[str]] = None  # previous hypothesis (words)
        self._last: List[str] = []

    @property
    def audio_s(self) -> float:
        return self.n_samples / SAMPLE_RATE

    def audio(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, np.float32)

    def feed(self, audio: np.ndarray) -> Optional[TranscriptEvent]:
        """Append 16 kHz samples; a partial event when enough new audio arrived for a new hypothesis."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size:
            self._chunks.append(audio)
            self.n_samples += audio.size
        new_s = (self.n_samples - self._last_run) / SAMPLE_RATE
        if new_s < self.options.min_chunk_s or self.audio_s < MIN_AUDIO_SECONDS:
            return None
        words, asr_s = self._hypothesis()
        if self._prev is not None:
            agreed = common_prefix_len(self._prev, words)
            if agreed > len(self.committed):
                self.committed += words[len(self.committed):agreed]
        self._prev = words
        tail = words[len(self.committed):] if common_prefix_len(words, self.committed) == len(self.committed) else []
        return TranscriptEvent("partial", " ".join(self.committed), " ".join(tail), self.audio_s, asr_s)

    def finalize(self) -> TranscriptEvent:
        """Transcribe the whole utterance once more and commit the rest of it; then reset."""
        asr_s = 0.0
        if self.audio_s >= MIN_AUDIO_SECONDS:
            if self.n_samples != self._last_run or self._prev is None:
                self._last, asr_s = self._hypothesis()
            words = self._last
            # Committed words stay; the final hypothesis supplies what follows them.
            self.committed += words[len(self.committed):]
        event = TranscriptEvent("final", " ".join(self.committed), "", self.audio_s, asr_s)
        self.reset()
        return event

    def _hypothesis(self):
        t0 = time.perf_counter()
        text = self.asr.transcribe(self.audio(), self.options.transcribe).text
        self._last_run = self.n_samples
        self._last = text.split()
        return self._last, time.perf_counter() - t0


class VadTranscriber:
    """Continuous 16 kHz audio -> transcript events: VAD finds utterances, each is streamed to Whisper."""

    def __init__(self, asr, options: Optional[StreamingOptions] = None, vad_options: Optional[VadOptions] = None,
                 vad_model: Optional[SileroVad] = None):
        self.vad = VADIterator(vad_options, vad_model)
        self.stt = StreamingTranscriber(asr, options)
        # audio kept before a start event: the start is reported min_speech_ms (+ pad) after it happened
        o = self.vad.options
        self._keep = int(SAMPLE_RATE * (o.min_speech_ms + o.speech_pad_ms + 500) / 1000)
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self.stt.reset()
        self._recent = np.zeros(0, np.float32)  # last samples of the stream, ends at vad.n_samples
        self._utt_start: Optional[int] = None  # stream sample where the current utterance starts
        self._utt_fed = 0  # stream sample up to which the utterance buffer is filled

    def feed(self, audio: np.ndarray) -> List[TranscriptEvent]:
        """Push samples; return the partial/final events they produce, in order."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        events: List[TranscriptEvent] = []
        self._recent = np.concatenate([self._recent, audio])[-max(self._keep, audio.size + self._keep):]
        for ev in self.vad.feed(audio):
            if ev.kind == "start":
                self._utt_start = self._utt_fed = ev.sample
            elif self._utt_start is not None:
                events += self._pump(ev.sample)
                events.append(self._final())
        if self._utt_start is not None:
            events += self._pump(self.vad.n_samples)
            if self.stt.audio_s >= self.stt.options.max_utterance_s:
                events.append(self._final())
                self._utt_start = self._utt_fed = self.vad.n_samples
        self._recent = self._recent[-self._keep:]
        return events

    def flush(self) -> List[TranscriptEvent]:
        """End of stream: close an open utterance."""
        events: List[TranscriptEvent] = []
        for ev in self.vad.flush():
            if ev.kind == "start":
                self._utt_start = self._utt_fed = ev.sample
            elif self._utt_start is not None:
                events += self._pump(ev.sample)
                events.append(self._final())
        return events

    def _pump(self, until: int) -> List[TranscriptEvent]:
        """Move stream samples [utt_fed, until) into the utterance buffer."""
        until = min(until, self.vad.n_samples)
        if self._utt_start is None or until <= self._utt_fed:
            return []
        first = self.vad.n_samples - self._recent.size  # stream sample of _recent[0]
        lo = max(self._utt_fed, first)
        piece = self._recent[lo - first:until - first]
        self._utt_fed = until
        ev = self.stt.feed(piece)
        if ev is None:
            return []
        ev.start_s = self._utt_start / SAMPLE_RATE
        return [ev]

    def _final(self) -> TranscriptEvent:
        start = self._utt_start or 0
        ev = self.stt.finalize()
        ev.start_s = start / SAMPLE_RATE
        self._utt_start = None
        return ev


def stream_transcripts(asr, chunks: Iterable[np.ndarray], options: Optional[StreamingOptions] = None,
                       vad_options: Optional[VadOptions] = None) -> Iterator[TranscriptEvent]:
    """Transcript events for a stream of 16 kHz chunks (a microphone, or a file read piece by piece)."""
    vt = VadTranscriber(asr, options, vad_options)
    for chunk in chunks:
        yield from vt.feed(chunk)
    yield from vt.flush()
