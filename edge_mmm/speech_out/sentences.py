"""Streamed answer text -> whole sentences, so speech can start after the first sentence, not the answer."""

from __future__ import annotations

import re
from typing import List

# a sentence ends at . ! ? (or a newline) followed by whitespace; "3.5" and "e.g." inside a word do not end one
_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+|\n+")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "e.g.", "i.e.", "etc.", "vs.", "no.", "approx."}
MAX_CHARS = 160  # a clause this long is spoken at its last comma instead of waiting for the full stop


class SentenceSplitter:
    """Feed text deltas; get back the sentences they complete. `flush()` returns the unfinished rest."""

    def __init__(self, max_chars: int = MAX_CHARS):
        self.max_chars = max_chars
        self._buf = ""

    def feed(self, text: str) -> List[str]:
        self._buf += text
        out: List[str] = []
        start = 0
        for m in _END.finditer(self._buf):
            piece = self._buf[start:m.start()].strip()
            last = piece.rsplit(None, 1)[-1].lower() if piece else ""
            if last in _ABBREVIATIONS:
                continue
            if piece:
                out.append(piece)
            start = m.end()
        self._buf = self._buf[start:]
        if len(self._buf) > self.max_chars:
            cut = self._buf.rfind(", ", 0, self.max_chars)
            cut = cut + 1 if cut > 0 else self._buf.rfind(" ", 0, self.max_chars)
            if cut > 0:
                out.append(self._buf[:cut].strip())
                self._buf = self._buf[cut:].lstrip()
        return out

    def flush(self) -> List[str]:
        rest, self._buf = self._buf.strip(), ""
        return [rest] if rest else []

    def reset(self) -> None:
        self._buf = ""
