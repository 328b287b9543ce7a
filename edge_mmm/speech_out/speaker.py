"""The speaker: streamed answer text in, sentences synthesized one by one, played as soon as each is ready.

    speaker = Speaker(EspeakTts(), SoundDeviceSink())
    speaker.start()
    speaker.say("Hello there. How", tag=1); speaker.say(" are you?", tag=1); speaker.end(tag=1)
    speaker.stop()          # barge-in: drops queued sentences, kills the synthesis, silences the sink
    speaker.hold(); speaker.release()   # synthesize, but play nothing until released (a stop() drops what waits)
    speaker.close()

`first_audio` yields (tag, monotonic time the tag's first sample was played), measured by the sink.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple


from edge_mmm.speech_out.aec import EchoCancelConfig, EchoCanceller
from edge_mmm.speech_out.echo import EchoGate, EchoGateConfig
from edge_mmm.speech_out.playback import PlaybackBuffer
from edge_mmm.speech_out.sentences import SentenceSplitter
from edge_mmm.speech_out.tts import TtsEngine

POLL_S = 0.02


@dataclass
class SpeakerConfig:
    echo: EchoGateConfig = field(default_factory=EchoGateConfig)
    volume: float = 1.0  # scale of the synthesized samples (0-1)
    # acoustic echo cancellation before the gate (WebRTC AEC3, extra `aec`); None: the half-duplex gate alone
    echo_cancel: Optional[EchoCancelConfig] = None


class Speaker:
    """Sentence splitter -> TTS thread -> PlaybackBuffer -> sink. Every method but `close` is non-blocking."""

    def __init__(self, tts: TtsEngine, sink, config: Optional[SpeakerConfig] = None,
                 on_error: Optional[Callable[[str], None]] = None):
        self.tts = tts
        self.sink = sink
        self.config = config or SpeakerConfig()
        self.buffer = PlaybackBuffer(tts.sample_rate)
        if self.config.echo_cancel is not None:  # livekit is imported here (MissingExtraError naming `aec`)
            self.echo_gate = EchoCanceller(self.buffer, self.config.echo, self.config.echo_cancel)
        else:
            self.echo_gate = EchoGate(self.buffer, self.config.echo)
        self.on_error = on_error or (lambda message: None)
        self.on_first_audio: Callable[[Any, float], None] = lambda tag, t: None
        self.on_stop: Callable[[], None] = lambda: None  # after a stop() that silenced something
        self._splitter = SentenceSplitter()
        self._queue: "queue.Queue[Tuple[int, Any, str]]" = queue.Queue()
        self._epoch = 0  # bumped by stop(): sentences and samples of an older epoch are dropped
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._released = threading.Event()  # clear while held: synthesized sentences wait before the buffer
        self._released.set()
        self.thread: Optional[threading.Thread] = None
        self.spoken: List[Tuple[Any, str]] = []  # (tag, sentence) handed to the buffer, newest last (64)
        self.stops: List[Tuple[float, int]] = []  # (time of stop(), samples it dropped unplayed), newest last (16)

    # -------------------------------------------------------------- control
    def start(self) -> None:
        self.sink.start(self.buffer)
        self.thread = threading.Thread(target=self._run, name="edge-mmm-tts", daemon=True)
        self.thread.start()

    def say(self, text: str, tag: Any = None) -> None:
        """More answer text; each sentence it completes is queued for synthesis."""
        with self._lock:
            for sentence in self._splitter.feed(text):
                self._queue.put((self._epoch, tag, sentence))

    def end(self, tag: Any = None) -> None:
        """The answer is complete: speak its unfinished last sentence too."""
        with self._lock:
            for sentence in self._splitter.flush():
                self._queue.put((self._epoch, tag, sentence))

    def hold(self) -> None:
        """Play nothing new until `release()`: sentences are still synthesized, then wait (a `stop()` drops
        them; the hold stays)."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    @property
    def held(self) -> bool:
        return not self._released.is_set()

    def stop(self) -> float:
        """Silence now: forget queued text, cancel the synthesis, empty the buffer. Returns the stop time."""
        with self._lock:
            self._epoch += 1
            self._splitter.reset()
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
                self._queue.task_done()
            self.tts.cancel()
            t, dropped = self.buffer.clear()
            self.stops = (self.stops + [(t, dropped)])[-16:]
        if dropped:
            self.on_stop()
        return t

    def is_playing(self) -> bool:
        """Text queued, being synthesized, or samples waiting to be played."""
        return self._queue.unfinished_tasks > 0 or self.buffer.pending() > 0

    def wait_done(self, timeout: float) -> bool:
        """Wait until everything said has been played (True) or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        while self.is_playing():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def close(self, timeout: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout
        self.stop()
        self._closing.set()
        ok = True
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
            ok = not self.thread.is_alive()
        return self.sink.close(max(0.0, deadline - time.monotonic())) and ok

    @property
    def threads(self) -> List[threading.Thread]:
        return [t for t in (self.thread, getattr(self.sink, "thread", None)) if t is not None]

    # -------------------------------------------------------------- TTS thread
    def _report_started(self) -> None:
        while True:
            try:
                tag, t = self.buffer.started.get_nowait()
            except queue.Empty:
                return
            self.on_first_audio(tag, t)

    def _run(self) -> None:
        while not self._closing.is_set():
            self._report_started()  # here, not in the sink: a PortAudio callback must not publish events
            try:
                epoch, tag, sentence = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                if epoch == self._epoch:
                    self._speak(epoch, tag, sentence)
            finally:
                self._queue.task_done()  # after the push: is_playing() never sees a gap
        self._report_started()

    def _speak(self, epoch: int, tag: Any, sentence: str) -> None:
        try:
            samples = self.tts.synthesize(sentence)
        except Exception as exc:  # noqa: BLE001 - a failed sentence is reported; speech goes on
            self.on_error(f"text-to-speech failed on {sentence[:40]!r}: {exc.__class__.__name__}: {exc}")
            return
        while not self._released.wait(POLL_S / 4):  # held: wait for release, or a stop that drops these samples
            if epoch != self._epoch or self._closing.is_set():
                return
        with self._lock:  # a stop() during synthesis bumped the epoch: these samples are stale
            if epoch == self._epoch and samples.size:
                self.buffer.push(samples * self.config.volume, tag)
                self.spoken = (self.spoken + [(tag, sentence)])[-64:]
