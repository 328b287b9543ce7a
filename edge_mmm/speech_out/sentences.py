"""Streamed answer text -> whole sentences, so speech can start after the first sentence, not the answer."""

from __future__ import annotations

import re
from typing import List

# a sentence ends at . ! ? (or a newline) followed by whitespace; "3.5" and "e.g." inside a word do not end one
_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+|\n+")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "e.g.", "i.e.", "etc.", "vs.", "no.", "approx."}
MAX_CHARS = 160  # a clause this long is spoken at its last comma instead of waiting for the full stop
_CLAUSE = re.compile(r"[,;:]\s+")
FIRST_CLAUSE_WORDS = 4  # an answer's first clause of at least this many words is spoken at once: sooner audio
FIRST_WORDS = 6  # ... and with no comma or full stop by then, its first this many words are


class SentenceSplitter:
    """Feed text deltas; get back the sentences they complete. `flush()` returns the unfinished rest.

    The first piece of an answer may be a clause (up to a comma) of `first_clause_words` words or more, or
    its first `first_words` words when no punctuation came by then: the listener hears the answer start while
    the model is still writing its first sentence (at the cost of a pause in its intonation there).
    0 turns either rule off."""

    def __init__(self, max_chars: int = MAX_CHARS, first_clause_words: int = FIRST_CLAUSE_WORDS,
                 first_words: int = FIRST_WORDS):
        self.max_chars = max_chars
        self.first_clause_words = first_clause_words
        self.first_words = first_words
        self._buf = ""
        self._first = True  # nothing of this answer emitted yet

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
        if self._first and not out and self.first_clause_words:
            for m in _CLAUSE.finditer(self._buf):
                piece = self._buf[:m.start() + 1].strip()
                if len(piece.split()) >= self.first_clause_words:
                    out.append(piece)
                    self._buf = self._buf[m.end():]
                    break
        if self._first and not out and self.first_words:
            words = list(re.finditer(r"\S+\s+", self._buf))  # complete words: followed by whitespace
            if len(words) >= self.first_words:
                cut = words[self.first_words - 1].end()
                out.append(self._buf[:cut].strip())
                self._buf = self._buf[cut:]
        if len(self._buf) > self.max_chars:
            cut = self._buf.rfind(", ", 0, self.max_chars)
            cut = cut + 1 if cut > 0 else self._buf.rfind(" ", 0, self.max_chars)
            if cut > 0:
                out.append(self._buf[:cut].strip())
                self._buf = self._buf[cut:].lstrip()
        if out:
            self._first = False
        return out

    def flush(self) -> List[str]:
        """The answer ended: its unfinished rest (the next `feed` starts a new answer)."""
        rest, self._buf, self._first = self._buf.strip(), "", True
        return [rest] if rest else []

    def reset(self) -> None:
        self._buf, self._first = "", True
