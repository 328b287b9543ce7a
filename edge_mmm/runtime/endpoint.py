"""Does a transcript read as a finished sentence? The live assistant's opt-in early endpoint
(`LiveConfig.sentence_end_silence_ms`) ends a turn after a shorter silence when the pause's speculative
transcript does: Whisper writes the closing punctuation it hears in the intonation ("What do you see?"), and
a speaker who stops mid-sentence usually leaves a transcript without it, or one that ends on a word no
English sentence ends on ("... next to the.").
"""

from __future__ import annotations

import re

# words a finished English sentence does not end on: articles, conjunctions, prepositions, auxiliaries,
# possessives (Whisper sometimes closes a trailing-off clause with a period: "I want to.")
OPEN_ENDINGS = frozenset("""
a an the and or but nor so because if that than then as of to in on at by for from with without about into
onto over under between after before during like is are was were be been am do does did have has had can
could will would shall should may might must my your his her its our their this these those what which who
whose where when how why very not
""".split())
_CLOSERS = "\"'”’)]}»"


def ends_sentence(text: str) -> bool:
    """True when `text` ends with `?`, `!`, or a `.` that is not an ellipsis, and its last word is not one
    of OPEN_ENDINGS; False for an empty text."""
    t = text.strip().rstrip(_CLOSERS).rstrip()
    if not t or t.endswith(("...", "…")) or t[-1] not in ".?!":
        return False
    words = re.findall(r"[\w']+", t.lower())
    return bool(words) and words[-1] not in OPEN_ENDINGS
