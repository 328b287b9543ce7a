"""Spoken answers in the live runtime: a bus listener that feeds a `speech_out.Speaker` the answer text,
stops it when the user barges in or asks anew, and times "first audio out" per turn.

The turn's `timing` event carries `eos_to_first_token_s`; the first `answer.delta` is published the moment
the first token exists, so end of speech -> first audio out = eos_to_first_token_s + (first played sample
- first delta), with the played sample's time measured by the sink. Published as a `timing` event with
`stage: "speech_out"`: `first_token_to_audio_s`, `ttfa_s` (turn start -> first audio) and, for a spoken
question, `eos_to_first_audio_s`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional

from edge_mmm.runtime.events import Event, EventBus

KEEP_TURNS = 8  # turns whose timing parts are remembered while the other part is outstanding


class SpokenAnswers:
    """Wires a Speaker to an EventBus. `enabled` may be switched at run time (the demo page's toggle)."""

    def __init__(self, speaker, bus: EventBus, enabled: bool = True):
        self.speaker = speaker
        self.bus = bus
        self.enabled = enabled
        self._lock = threading.Lock()
        self._first_delta: Dict[Any, float] = {}  # turn -> monotonic time of its first answer.delta
        self._turn_timing: Dict[Any, Dict[str, Any]] = {}
        self._first_audio: Dict[Any, float] = {}
        speaker.on_first_audio = self._on_first_audio
        speaker.on_error = lambda message: bus.publish("error", source="speaker", message=message)
        bus.add_listener(self)

    @property
    def threads(self) -> List[threading.Thread]:
        return self.speaker.threads

    def start(self) -> None:
        self.speaker.start()

    def close(self, timeout: float) -> bool:
        return self.speaker.close(timeout)

    def barge_in(self) -> None:
        """The user started talking: stop speaking at once."""
        if self.speaker.is_playing():
            heard = not self.speaker.held  # a held answer was never heard: nothing to announce
            self.speaker.stop()
            if heard:
                self.bus.publish("notice", source="speaker", message="barge-in: new speech stopped the spoken answer")

    def hold(self) -> None:
        """The question may still go on (the early endpoint's window): play nothing yet."""
        self.speaker.hold()

    def release(self) -> None:
        self.speaker.release()

    def drop(self) -> None:
        """Forget what is queued or held, silently, and end the hold (the question went on)."""
        self.speaker.stop()
        self.speaker.release()

    def set_enabled(self, on: bool) -> None:
        self.enabled = on
        if not on:
            self.speaker.stop()

    # ------------------------------------------------------------------ bus listener (publisher's thread)
    def __call__(self, event: Event) -> None:
        d = event.data
        if event.type == "answer.delta":
            turn = d.get("turn")
            with self._lock:
                if turn not in self._first_delta:
                    self._first_delta[turn] = time.monotonic()
                    self._trim(self._first_delta)
            if self.enabled:
                self.speaker.say(d["text"], turn)
        elif event.type == "answer.done":
            if d.get("cancelled"):
                self.speaker.stop()
            elif self.enabled:
                self.speaker.end(d.get("turn"))
        elif event.type == "transcript.final":
            self.speaker.stop()  # a new question: the old answer is no longer wanted
        elif event.type == "timing" and d.get("stage") == "turn":
            with self._lock:
                self._turn_timing[d.get("turn")] = dict(d)
                self._trim(self._turn_timing)
            self._publish(d.get("turn"))

    def _on_first_audio(self, turn: Any, t: float) -> None:
        with self._lock:
            self._first_audio[turn] = t
            self._trim(self._first_audio)
        self._publish(turn)

    @staticmethod
    def _trim(d: Dict[Any, Any]) -> None:
        while len(d) > KEEP_TURNS:
            d.pop(next(iter(d)))

    def _publish(self, turn: Any) -> None:
        with self._lock:
            if turn not in self._first_audio or turn not in self._turn_timing or turn not in self._first_delta:
                return
            t_audio = self._first_audio.pop(turn)
            timing = self._turn_timing.pop(turn)
            t_delta = self._first_delta.pop(turn)
        after = t_audio - t_delta
        out: Dict[str, Optional[float]] = {"stage": "speech_out", "turn": turn, "source": timing.get("source"),
                                           "first_token_to_audio_s": round(after, 6)}
        if timing.get("ttft_s") is not None:
            out["ttfa_s"] = round(timing["ttft_s"] + after, 6)
        if timing.get("eos_to_first_token_s") is not None:
            out["eos_to_first_audio_s"] = round(timing["eos_to_first_token_s"] + after, 6)
        self.bus.publish("timing", **out)
