"""Streaming Whisper: re-transcribe the growing utterance and commit words with LocalAgreement-2.

As in whisper_streaming (Machacek et al., 2023): a word is committed once two consecutive hypotheses
agree on it and on every word before it. Committed text only grows; the uncommitted tail is shown as
tentative. Each hypothesis transcribes the whole utterance from its start, so an utterance is bounded
by Whisper's 30 s window (`max_utterance_s`, after which it is finalized and a new one begins).

`StreamingTranscriber` handles one utterance. A continuous stream is cut into utterances in two halves that
the live runtime runs on two threads, so the VAD never waits behind a Whisper pass: `SpeechSegmenter` (Silero
VAD: utterance start, audio, pause = the first silent frame, resume, end) and `UtteranceRecognizer` (the
Whisper passes: partials while the speech goes on, a speculative final pass at the pause, kept if the speech
ends there and dropped if it resumes, the final at the end). `VadTranscriber` runs both in one thread.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge_mmm.asr.backends import PassInterrupted
from edge_mmm.asr.transcribe import TranscribeOptions
from edge_mmm.audio.constants import CHUNK_LENGTH, MIN_AUDIO_SECONDS, SAMPLE_RATE
from edge_mmm.audio.vad import SileroVad, VADIterator, VadOptions
from edge_mmm.errors import InputError


UNSTOPPABLE_SPECULATE_AFTER_S = 0.1  # a dip inside a word would cost such a backend a whole pass


@dataclass
class StreamingOptions:
    """When to re-transcribe and how to decode (greedy, no temperature fallback, by default)."""

    min_chunk_s: float = 1.0  # new audio needed before the next hypothesis
    max_utterance_s: float = CHUNK_LENGTH - 2.0  # finalize before the buffer outgrows one Whisper window
    # silence that starts the speculative final pass: the first silent VAD chunk (32 ms; at least the VAD's
    # 30 ms end padding must have arrived). The 32-64 ms dips inside words start passes too, but speech
    # resuming stops a running speculative pass (`UtteranceRecognizer.interrupt_speculative`), so a dip
    # costs the few ms until the next voiced chunk, not a whole pass. With an ASR whose passes cannot be
    # stopped (torch, TensorRT) the pass waits for `UNSTOPPABLE_SPECULATE_AFTER_S` of silence instead
    speculate_after_s: float = 0.03
    # the full 30 s window (openai-whisper's tokens). `audio_ctx_margin=50` cuts the encoder input to the
    # utterance + 1 s (whisper.cpp's audio_ctx): several times less encoder work, +0.6 WER points over 32
    # held-out clips (benchmarks/asr_audio_ctx.py, docs/live.md), but it turned "What is the capital of
    # France?" (espeak-ng, the demo/bundle/run tests' clip) into "... and friends" on every cut tried, so it
    # is an option, not the default
    transcribe: TranscribeOptions = field(default_factory=lambda: TranscribeOptions(temperatures=(0.0,),
                                                                                    audio_ctx_margin=None))

    def __post_init__(self):
        if self.min_chunk_s <= 0:
            raise InputError(f"StreamingOptions.min_chunk_s must be > 0, got {self.min_chunk_s}")
        if self.speculate_after_s < 0:
            raise InputError(f"StreamingOptions.speculate_after_s must be >= 0, got {self.speculate_after_s}")
        if not MIN_AUDIO_SECONDS < self.max_utterance_s <= CHUNK_LENGTH:
            raise InputError(f"StreamingOptions.max_utterance_s must be in ({MIN_AUDIO_SECONDS}, {CHUNK_LENGTH}], "
                             f"got {self.max_utterance_s}")


@dataclass
class TranscriptEvent:
    """A transcript of one utterance: "partial" (text may still change after `committed`), "final",
    "speculative" (the final text if the speech ends at the pause now going on; nothing is committed) or
    "discarded" (the speech resumed: the speculative text is void)."""

    kind: str  # "partial" | "final" | "speculative" | "discarded"
    committed: str  # agreed text; later events of the utterance only append to it
    tentative: str  # the latest hypothesis after the committed words ("" in a final event)
    audio_s: float  # utterance audio transcribed so far
    asr_s: float  # seconds the transcription behind this event took (0: no pass, an earlier one's text)
    start_s: float = 0.0  # utterance start in the stream (VadTranscriber), else 0
    end_s: Optional[float] = None  # final/speculative: end of speech in the stream (None: cut at the window)
    pass_t: Optional[float] = None  # monotonic time the Whisper pass behind the text began (None: no pass)
    reused: bool = False  # final: the text is the speculative pass's, or the last partial's (no new pass)

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
        self._draft: List[int] = []  # tokens of the latest pass: the next pass checks them in one decoder call

    @property
    def audio_s(self) -> float:
        return self.n_samples / SAMPLE_RATE

    def audio(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, np.float32)

    def append(self, audio: np.ndarray) -> None:
        """Add 16 kHz samples without transcribing."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size:
            self._chunks.append(audio)
            self.n_samples += audio.size

    def due(self) -> bool:
        """Enough new audio arrived for the next partial hypothesis."""
        new_s = (self.n_samples - self._last_run) / SAMPLE_RATE
        return new_s >= self.options.min_chunk_s and self.audio_s >= MIN_AUDIO_SECONDS

    def feed(self, audio: np.ndarray) -> Optional[TranscriptEvent]:
        """Append 16 kHz samples; a partial event when enough new audio arrived for a new hypothesis."""
        self.append(audio)
        return self.step() if self.due() else None

    def step(self) -> TranscriptEvent:
        """Transcribe the utterance so far (a partial hypothesis) and commit what two hypotheses agree on."""
        t_pass = time.monotonic()
        words, asr_s = self._hypothesis()
        if self._prev is not None:
            agreed = common_prefix_len(self._prev, words)
            if agreed > len(self.committed):
                self.committed += words[len(self.committed):agreed]
        self._prev = words
        tail = words[len(self.committed):] if common_prefix_len(words, self.committed) == len(self.committed) else []
        return TranscriptEvent("partial", " ".join(self.committed), " ".join(tail), self.audio_s, asr_s,
                               pass_t=t_pass)

    @property
    def has_hypothesis(self) -> bool:
        """A partial hypothesis of this utterance has been made."""
        return self._prev is not None

    def settled(self, n: int) -> bool:
        """The latest partial hypothesis covered the first `n` samples and is committed whole (two passes
        agreed on every word): a final pass over them would have nothing to add."""
        return (self._prev is not None and self._last_run >= n and len(self.committed) == len(self._prev)
                and common_prefix_len(self._prev, self.committed) == len(self.committed))

    def hypothesis(self, n: int) -> Tuple[List[str], float]:
        """Words of the first `n` samples, without touching the agreement state (a speculative pass)."""
        t0 = time.perf_counter()
        text = self._transcribe(self.audio()[:n])
        return text.split(), time.perf_counter() - t0

    def finalize(self, words: Optional[Sequence[str]] = None, asr_s: float = 0.0, n: Optional[int] = None
                 ) -> TranscriptEvent:
        """Commit the rest of the utterance and reset. `words` (of a pass that already ran, `asr_s` long) are
        the final hypothesis; else the first `n` samples (default: all) are transcribed once more, unless
        the last hypothesis already covers them."""
        n = self.n_samples if n is None else min(n, self.n_samples)
        audio_s = n / SAMPLE_RATE
        if audio_s < MIN_AUDIO_SECONDS:
            words, asr_s = [], 0.0
        elif words is None:
            asr_s = 0.0
            words = self._last
            if n != self._last_run or self._prev is None:
                words, asr_s = self.hypothesis(n)
        # Committed words stay; the final hypothesis supplies what follows them.
        self.committed += list(words)[len(self.committed):]
        event = TranscriptEvent("final", " ".join(self.committed), "", audio_s, asr_s)
        self.reset()
        return event

    def _transcribe(self, audio: np.ndarray) -> str:
        """One Whisper pass; the previous pass's tokens go along as the draft (same text, fewer decoder calls:
        `decode_window`). An ASR whose transcripts carry no tokens is called without one."""
        extra = {"draft": self._draft} if self._draft else {}
        transcript = self.asr.transcribe(audio, self.options.transcribe, **extra)
        self._draft = list(getattr(transcript, "tokens", ()))
        return transcript.text

    def _hypothesis(self):
        t0 = time.perf_counter()
        text = self._transcribe(self.audio())
        self._last_run = self.n_samples
        self._last = text.split()
        return self._last, time.perf_counter() - t0


@dataclass
class SpeechEvent:
    """What the VAD saw, for the recognizer. `sample` is a stream sample: "start": where the utterance
    begins; "audio": where `audio` begins; "pause" / "end": where the utterance's audio ends if the speech
    ends there (the first silent sample + the VAD's end padding); "resume": the sample at which speech went on."""

    kind: str  # "start" | "audio" | "pause" | "resume" | "end"
    sample: int
    audio: Optional[np.ndarray] = None
    speech_end: Optional[int] = None  # pause / end: the first silent sample (end: None = cut at Whisper's window)


class SpeechSegmenter:
    """Continuous 16 kHz audio -> `SpeechEvent`s with Silero VAD; never runs Whisper, so it keeps up in real
    time. An utterance longer than `max_utterance_s` is ended there and a new one starts."""

    def __init__(self, vad_options: Optional[VadOptions] = None, vad_model: Optional[SileroVad] = None,
                 max_utterance_s: float = StreamingOptions.max_utterance_s):
        self.vad = VADIterator(vad_options, vad_model)
        o = self.vad.options
        self.pad = int(SAMPLE_RATE * o.speech_pad_ms / 1000)
        self._max = int(max_utterance_s * SAMPLE_RATE)
        # audio kept before a start event: the start is reported min_speech_ms (+ pad) after it happened
        self._keep = int(SAMPLE_RATE * (o.min_speech_ms + o.speech_pad_ms + 500) / 1000)
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self._recent = np.zeros(0, np.float32)  # last samples of the stream, ends at vad.n_samples
        self._utt_start: Optional[int] = None  # stream sample where the current utterance starts
        self._utt_fed = 0  # stream sample up to which the utterance's audio was handed on
        self._paused: Optional[int] = None  # first silent sample of the pause now going on

    @property
    def n_samples(self) -> int:
        return self.vad.n_samples

    @property
    def in_utterance(self) -> bool:
        return self._utt_start is not None

    @property
    def pause(self) -> Optional[Tuple[int, float]]:
        """(first silent sample, seconds of silence so far) of the pause now going on in an utterance, else None."""
        if self._utt_start is None or self._paused is None:
            return None
        return self._paused, (self.vad.n_samples - self._paused) / SAMPLE_RATE

    def feed(self, audio: np.ndarray) -> List[SpeechEvent]:
        """Push samples; return the events they complete, in order."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self._recent = np.concatenate([self._recent, audio])[-max(self._keep, audio.size + self._keep):]
        out = self._segment(self.vad.feed(audio))
        if self._utt_start is not None:
            out += self._pump(self.vad.n_samples)
            silent = self.vad.silence_from
            if silent != self._paused:
                out.append(SpeechEvent("resume", self.vad.n_samples) if silent is None
                           else SpeechEvent("pause", silent + self.pad, speech_end=silent))
                self._paused = silent
            if self._utt_fed - self._utt_start >= self._max:
                out.append(SpeechEvent("end", self._utt_fed))
                self._utt_start, self._paused = self._utt_fed, None
                out.append(SpeechEvent("start", self._utt_fed))
        self._recent = self._recent[-self._keep:]
        return out

    def flush(self) -> List[SpeechEvent]:
        """End of stream: close an open utterance, inside a pause where the pause began (as the end-silence
        wait would have), so a pass already run over the pause's audio is the final one."""
        return self._segment(self.vad.flush(at_pause=True))

    def end_at_pause(self) -> List[SpeechEvent]:
        """End the utterance at the pause now going on (where its silence began, as the end-silence wait would),
        without waiting for the rest of that wait; nothing when there is no pause."""
        return self._segment(self.vad.end_pause())

    def _segment(self, vad_events) -> List[SpeechEvent]:
        out: List[SpeechEvent] = []
        for ev in vad_events:
            if ev.kind == "start":
                self._utt_start = self._utt_fed = ev.sample
                out.append(SpeechEvent("start", ev.sample))
            elif self._utt_start is not None:
                out += self._pump(ev.sample)
                out.append(SpeechEvent("end", ev.sample, speech_end=max(self._utt_start, ev.sample - self.pad)))
                self._utt_start, self._paused = None, None
        return out

    def _pump(self, until: int) -> List[SpeechEvent]:
        """Hand on stream samples [utt_fed, until) of the utterance."""
        until = min(until, self.vad.n_samples)
        if self._utt_start is None or until <= self._utt_fed:
            return []
        first = self.vad.n_samples - self._recent.size  # stream sample of _recent[0]
        lo = max(self._utt_fed, first)
        piece = self._recent[lo - first:until - first].copy()
        self._utt_fed = until
        return [SpeechEvent("audio", lo, audio=piece)]


def _cancel(handle) -> bool:
    """Stop the pass a `PassHandle` was made for; False when none runs or its backend cannot stop it."""
    if handle is None or not getattr(handle, "supported", False):
        return False
    handle.cancel()
    return True


@dataclass
class _Speculation:
    n: int  # utterance samples the pass covered
    words: List[str]
    asr_s: float
    pass_t: Optional[float]  # None: the words are the last partial's, no pass ran


class UtteranceRecognizer:
    """`SpeechEvent`s -> transcript events. `push()` takes events (cheap) and returns the final at an "end";
    `step()` runs at most one Whisper pass: with `speculate`, the speculative final once a pause has lasted
    `speculate_after_s` (its text is
    the final one if the speech ends there, and is dropped with a "discarded" event if it resumes); else a
    partial hypothesis when enough new audio arrived. A pause whose latest partial already covers the speech
    and agrees with the one before needs no pass: its words are the speculative (and final) text.
    `hold_partials()` True (the live runtime: an image is being encoded on the other core) defers partial
    passes (they resume, over all the audio so far, when it turns False); the pause's and the final pass
    are never held. From another thread (an onnxruntime Whisper: `ASRModel.interruptible`):
    `interrupt_partial()` (the VAD's, once a pause has lasted a while) stops a partial pass that is running,
    so the pause's pass need not wait for it; `interrupt_speculative()` (the VAD's, when the speech resumes)
    stops the pause's pass, whose text the resumed speech makes void. The final pass is never stopped."""

    def __init__(self, asr, options: Optional[StreamingOptions] = None, speculate: bool = True,
                 hold_partials: Optional[Callable[[], bool]] = None):
        self.stt = StreamingTranscriber(asr, options)
        self.speculate = speculate
        self.stoppable = bool(getattr(asr, "stoppable", False))  # its passes can be stopped (onnxruntime)
        self.hold_partials = hold_partials
        self.reset()

    def reset(self) -> None:
        self.stt.reset()
        self._start: Optional[int] = None  # stream sample of the utterance start
        self._pause: Optional[SpeechEvent] = None
        self._spec: Optional[_Speculation] = None
        self.speculative_passes = 0
        self.discarded_passes = 0
        self.interrupted_passes = 0
        self._partial = None  # the PassHandle of the partial pass now running (another thread may cancel it)
        self._speculating = None  # the PassHandle of the pause's speculative pass now running
        self.stopped_speculative_passes = 0  # speculative passes stopped because the speech resumed
        self._last_partial_interrupted = False  # no partial has ended since one was stopped

    @property
    def in_utterance(self) -> bool:
        return self._start is not None

    def push(self, events: Sequence[SpeechEvent]) -> List[TranscriptEvent]:
        out: List[TranscriptEvent] = []
        for ev in events:
            if ev.kind == "start":
                self.stt.reset()
                self._start, self._pause, self._spec = ev.sample, None, None
            elif self._start is None:
                continue
            elif ev.kind == "audio":
                self.stt.append(ev.audio)
            elif ev.kind == "pause":
                if self._spec is not None and self._spec.n != ev.sample - self._start:
                    out.append(self._discard())
                self._pause = ev
            elif ev.kind == "resume":
                self._pause = None
                if self._spec is not None:
                    out.append(self._discard())
            elif ev.kind == "end":
                out.append(self._final(ev))
        return out

    def has_work(self) -> bool:
        """`step()` has something to do."""
        if self._start is None:
            return False
        if self._pause is not None:
            received = self._start + self.stt.n_samples
            return (self.speculate and self._spec is None and received >= self._pause.sample
                    and received - self._pause.speech_end >= self.speculate_after_s * SAMPLE_RATE)
        return self.stt.due() and not (self.hold_partials is not None and self.hold_partials())

    @property
    def speculate_after_s(self) -> float:
        """Silence before the pause's pass: the options' (0.03 s), at least 0.1 s for an ASR that cannot stop it."""
        after = self.stt.options.speculate_after_s
        return after if self.stoppable else max(after, UNSTOPPABLE_SPECULATE_AFTER_S)

    def step(self) -> List[TranscriptEvent]:
        if not self.has_work():
            return []
        if self._pause is not None:
            n = self._pause.sample - self._start
            if self._settled():  # the last partial already says it all: its words, no pass
                words, asr_s, t_pass = list(self.stt.committed), 0.0, None
            else:
                t_pass = time.monotonic()
                try:
                    words, asr_s = self._interruptible("_speculating", lambda: self.stt.hypothesis(n))
                except PassInterrupted:  # the speech resumed: the pushed "resume" ends this pause
                    self.stopped_speculative_passes += 1
                    return []
                self.speculative_passes += 1
            self._spec = _Speculation(n, words, asr_s, t_pass)
            committed = self.stt.committed
            return [TranscriptEvent("speculative", " ".join(committed + words[len(committed):]), "", n / SAMPLE_RATE,
                                    asr_s, self._start / SAMPLE_RATE, self._pause.speech_end / SAMPLE_RATE, t_pass)]
        try:
            ev = self._interruptible("_partial", self.stt.step)
        except PassInterrupted:  # the speaker paused: the pause's pass covers this audio and more
            self.interrupted_passes += 1
            self._last_partial_interrupted = True
            return []
        self._last_partial_interrupted = False
        ev.start_s = self._start / SAMPLE_RATE
        return [ev]

    def _interruptible(self, slot: str, run: Callable):
        """`run()` with its pass's handle in `self.<slot>` while it runs, for another thread to cancel."""
        interruptible = getattr(self.stt.asr, "interruptible", None)
        with (interruptible() if interruptible is not None else contextlib.nullcontext()) as handle:
            setattr(self, slot, handle)
            try:
                return run()
            finally:
                setattr(self, slot, None)

    def interrupt_partial(self, always: bool = False) -> bool:
        """Stop the partial pass now running, if any (thread-safe); True when one was told to stop. Unless
        `always` (stopping the runtime), not the utterance's first partial and not two in a row: the speaker
        sees a partial transcript, and it still moves on when they pause often."""
        if not always and (self._last_partial_interrupted or not self.stt.has_hypothesis):
            return False
        return _cancel(self._partial)

    def interrupt_speculative(self) -> bool:
        """Stop the pause's speculative pass now running, if any (thread-safe; call it after handing on the
        "resume" event, so the recognizer sees the pause end before it could start the pass again); True
        when one was told to stop."""
        return _cancel(self._speculating)

    def _settled(self) -> bool:
        return self._pause is not None and self.stt.settled(self._pause.speech_end - self._start)

    def _discard(self) -> TranscriptEvent:
        spec, self._spec = self._spec, None
        self.discarded_passes += 1
        return TranscriptEvent("discarded", " ".join(spec.words), "", spec.n / SAMPLE_RATE, spec.asr_s,
                               self._start / SAMPLE_RATE, None, spec.pass_t)

    def _final(self, end: SpeechEvent) -> TranscriptEvent:
        n = end.sample - self._start
        spec = self._spec
        if spec is not None and spec.n == min(n, self.stt.n_samples):
            ev = self.stt.finalize(spec.words, spec.asr_s, n)
            ev.pass_t, ev.reused = spec.pass_t, True
        elif end.speech_end is not None and self.stt.settled(end.speech_end - self._start):
            ev = self.stt.finalize(list(self.stt.committed), 0.0, n)
            ev.reused = True
        else:
            t_pass = time.monotonic()
            ev = self.stt.finalize(n=n)
            ev.pass_t = t_pass if ev.asr_s > 0 else None
        ev.start_s = self._start / SAMPLE_RATE
        ev.end_s = end.speech_end / SAMPLE_RATE if end.speech_end is not None else None
        self._start, self._pause, self._spec = None, None, None
        return ev


class VadTranscriber:
    """Continuous 16 kHz audio -> transcript events in one thread: the segmenter, then the recognizer's
    passes (no speculative passes: here a pass blocks the VAD, so one at a pause would only add work)."""

    def __init__(self, asr, options: Optional[StreamingOptions] = None, vad_options: Optional[VadOptions] = None,
                 vad_model: Optional[SileroVad] = None):
        options = options or StreamingOptions()
        self.segmenter = SpeechSegmenter(vad_options, vad_model, options.max_utterance_s)
        self.recognizer = UtteranceRecognizer(asr, options, speculate=False)

    @property
    def vad(self) -> VADIterator:
        return self.segmenter.vad

    @property
    def stt(self) -> StreamingTranscriber:
        return self.recognizer.stt

    def reset(self) -> None:
        self.segmenter.reset()
        self.recognizer.reset()

    def feed(self, audio: np.ndarray) -> List[TranscriptEvent]:
        """Push samples; return the partial/final events they produce, in order."""
        return self._run(self.segmenter.feed(audio))

    def flush(self) -> List[TranscriptEvent]:
        """End of stream: close an open utterance."""
        return self._run(self.segmenter.flush())

    def _run(self, events: List[SpeechEvent]) -> List[TranscriptEvent]:
        out = self.recognizer.push(events)
        return out + self.recognizer.step()


def stream_transcripts(asr, chunks: Iterable[np.ndarray], options: Optional[StreamingOptions] = None,
                       vad_options: Optional[VadOptions] = None) -> Iterator[TranscriptEvent]:
    """Transcript events for a stream of 16 kHz chunks (a microphone, or a file read piece by piece)."""
    vt = VadTranscriber(asr, options, vad_options)
    for chunk in chunks:
        yield from vt.feed(chunk)
    yield from vt.flush()
