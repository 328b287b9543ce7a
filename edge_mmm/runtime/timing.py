"""Telemetry: every stage's timings (and faults, transcripts, answers) appended to a JSONL file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Union

from edge_mmm.errors import InputError
from edge_mmm.runtime.events import Event

LOGGED_TYPES = ("timing", "error", "notice", "transcript.final", "answer.done")  # deltas and partials are chatty


class JsonlLog:
    """An append-only JSONL log, one event per line, flushed per line so a crash loses nothing written."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"log path is a directory: {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot open log file {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if event.type not in LOGGED_TYPES:
            return
        with self._lock:
            if not self._f.closed:
                self._f.write(event.to_json() + "\n")
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()
