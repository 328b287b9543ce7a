"""Word error rate of a transcript against the spoken text (case and punctuation ignored)."""

import re


def normalized_wer(reference: str, hypothesis: str) -> float:
    import jiwer

    norm = lambda s: " ".join(re.sub(r"[^\w' ]", " ", s.lower()).split())  # noqa: E731
    return jiwer.wer(norm(reference), norm(hypothesis))
