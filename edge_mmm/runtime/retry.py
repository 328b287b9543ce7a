"""Source threads (camera, microphone, audio file) and retrying a failing source with exponential backoff."""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from edge_mmm.errors import InputError


@dataclass
class Backoff:
    """Delays initial_s, initial_s*factor, ... capped at max_s; reset after a source delivered data."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 8.0

    def __post_init__(self):
        if self.initial_s <= 0 or self.factor < 1 or self.max_s < self.initial_s:
            raise InputError(f"Backoff needs initial_s > 0, factor >= 1, max_s >= initial_s; got {self}")


def run_with_retry(attempt: Callable[[], bool], stop: threading.Event, backoff: Backoff,
                   on_error: Callable[[str, float], None]) -> None:
    """Call `attempt()` until `stop` is set. `attempt` returns whether it delivered data before it ended
    (True resets the delay) or raises; either way, unless stopped, `on_error(message, retry_in_s)` is
    called and the loop sleeps (interruptibly) before the next attempt."""
    delay = backoff.initial_s
    while not stop.is_set():
        try:
            delivered = attempt()
            message = "source ended"
        except Exception as exc:  # noqa: BLE001 - any driver failure is a fault to report and retry
            delivered = False
            message = f"{exc.__class__.__name__}: {exc}"
        if stop.is_set():
            return
        if delivered:
            delay = backoff.initial_s
        on_error(message, delay)
        if stop.wait(delay):
            return
        delay = min(delay * backoff.factor, backoff.max_s)


class SourceThread(abc.ABC):
    """A named daemon thread running `self.run()` until `stop()` sets `self.stopping`."""

    thread_name = "edge-mmm-source"

    def __init__(self):
        self.stopping = threading.Event()
        self.thread: Optional[threading.Thread] = None

    @abc.abstractmethod
    def run(self) -> None:
        """The source's loop (camera grabber, microphone stream, audio-file player); returns when stopping."""

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop and join; True when the thread ended."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True
