"""What the live runtime tells its listeners: small typed events, fanned out to bounded subscriber queues.

Event types (the `type` field):
  transcript.partial  {"text", "committed", "tentative", "utterance"}   while the user talks
  transcript.final    {"text", "utterance", "audio_s"}                  at end of speech
  answer.delta        {"text", "turn"}                                  streamed answer text
  answer.done         {"text", "turn", "finish_reason", "cancelled"}    end of an answer
  timing              {"stage", ...seconds...}                          per ASR hypothesis and per turn
  error               {"source", "message", ...}                        a fault; the runtime goes on
  notice              {"source", "message"}                             something the user should know
  speech.audio        {"rate", "pcm"}                                   spoken answer audio for a page (base64
                                                                        int16 LE mono; the demo's browser speaker)
  speech.stop         {}                                                drop the spoken audio not yet played
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

EVENT_TYPES = ("transcript.partial", "transcript.final", "answer.delta", "answer.done", "timing", "error",
               "notice", "speech.audio", "speech.stop")
SUBSCRIBER_QUEUE = 256  # events a subscriber may fall behind before its oldest are dropped


@dataclass
class Event:
    type: str
    data: Dict[str, Any]
    t: float = field(default_factory=time.time)  # wall clock (epoch seconds) when the event was made

    def __post_init__(self):
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {self.type!r}; one of {', '.join(EVENT_TYPES)}")

    def to_dict(self) -> Dict[str, Any]:
        return {"type": self.type, "t": round(self.t, 6), "data": self.data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


class EventBus:
    """Publish events to every subscriber without ever blocking the publisher.

    Each subscriber gets its own bounded queue; when it is full the oldest event is dropped (and counted
    in `dropped`), so a slow reader (a browser tab, a terminal) can never stall audio or generation.
    Listeners registered with `add_listener` are called synchronously (the JSONL log, the CLI printer).
    Events published before the first subscriber (a microphone's error while the models load) wait for it:
    its queue starts with the newest `maxsize` of them.
    """

    def __init__(self, maxsize: int = SUBSCRIBER_QUEUE):
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._queues: List["queue.Queue[Event]"] = []
        self._listeners: List[Callable[[Event], None]] = []
        self._early: Optional["deque[Event]"] = deque(maxlen=maxsize)  # None once someone subscribed
        self.dropped = 0

    def subscribe(self, maxsize: Optional[int] = None) -> "queue.Queue[Event]":
        q: "queue.Queue[Event]" = queue.Queue(maxsize=maxsize or self.maxsize)
        with self._lock:
            early, self._early = self._early or (), None
            for event in list(early)[-q.maxsize:] if q.maxsize > 0 else early:
                q.put_nowait(event)
            self._queues.append(q)
        return q

    def unsubscribe(self, q: "queue.Queue[Event]") -> None:
        with self._lock:
            if q in self._queues:
                self._queues.remove(q)

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def publish(self, type: str, **data) -> Event:
        event = Event(type, data)
        with self._lock:
            queues, listeners = list(self._queues), list(self._listeners)
            if self._early is not None:
                self._early.append(event)
        for q in queues:
            while True:
                try:
                    q.put_nowait(event)
                    break
                except queue.Full:
                    try:
                        q.get_nowait()
                        with self._lock:
                            self.dropped += 1
                    except queue.Empty:
                        pass
        for fn in listeners:
            fn(event)
        return event
