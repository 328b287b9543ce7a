"""Transcripts as subtitles: SubRip (.srt) and WebVTT (.vtt), one cue per segment, written as openai-whisper's
`WriteSRT` / `WriteVTT` write them (the same text for the same segments; tests/asr/test_subtitles.py)."""

from __future__ import annotations

from typing import Iterable

SUBTITLE_FORMATS = ("srt", "vtt")


def timestamp(seconds: float, always_hours: bool, decimal_marker: str) -> str:
    """`[HH:]MM:SS.mmm`, rounded to the millisecond; hours always (SRT) or only when non-zero (VTT)."""
    ms = round(max(seconds, 0.0) * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1_000)
    hours_part = f"{hours:02d}:" if always_hours or hours > 0 else ""
    return f"{hours_part}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cues(segments: Iterable, always_hours: bool, decimal_marker: str):
    for seg in segments:
        text = seg.text.strip().replace("-->", "->")  # "-->" would end the cue's timing line
        yield (timestamp(seg.start, always_hours, decimal_marker), timestamp(seg.end, always_hours, decimal_marker),
               text)


def to_srt(segments: Iterable) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    return "".join(f"{i}\n{start} --> {end}\n{text}\n\n"
                   for i, (start, end, text) in enumerate(_cues(segments, True, ","), start=1))


def to_vtt(segments: Iterable) -> str:
    """WebVTT: the `WEBVTT` header, then `[HH:]MM:SS.mmm --> [HH:]MM:SS.mmm` cues."""
    return "WEBVTT\n\n" + "".join(f"{start} --> {end}\n{text}\n\n" for start, end, text in _cues(segments, False, "."))


def subtitles(segments: Iterable, fmt: str) -> str:
    """The segments in `fmt` (one of SUBTITLE_FORMATS)."""
    return {"srt": to_srt, "vtt": to_vtt}[fmt](segments)
