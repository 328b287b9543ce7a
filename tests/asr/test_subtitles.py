"""SRT / VTT output vs openai-whisper's own writers (whisper.utils.WriteSRT / WriteVTT) on the same segments."""

from __future__ import annotations

import io

import pytest

from edge_mmm.asr.subtitles import to_srt, to_vtt
from edge_mmm.asr.transcribe import Segment

whisper_utils = pytest.importorskip("whisper.utils")

SEGMENTS = [
    Segment(0.0, 2.0, " What is the capital of France?"),
    Segment(2.0, 4.56, " The arrow --> points left."),  # "-->" inside a cue's text
    Segment(59.9996, 61.25, " Across a minute."),  # rounds up to 01:00.000
    Segment(3599.5, 3725.125, " Past an hour "),  # hours appear in VTT only from here
]


def _openai(writer_cls, segments) -> str:
    result = {"segments": [{"start": s.start, "end": s.end, "text": s.text} for s in segments]}
    out = io.StringIO()
    writer_cls(".").write_result(result, out)
    return out.getvalue()


@pytest.mark.parametrize("ours,theirs", [(to_srt, whisper_utils.WriteSRT), (to_vtt, whisper_utils.WriteVTT)],
                         ids=["srt", "vtt"])
def test_same_text_as_openai_whisper_writers(ours, theirs):
    assert ours(SEGMENTS) == _openai(theirs, SEGMENTS)
    assert ours([]) == _openai(theirs, [])


def test_cue_shapes():
    srt = to_srt(SEGMENTS[:2])
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,000\nWhat is the capital of France?\n\n2\n")
    assert "The arrow -> points left." in srt
    vtt = to_vtt(SEGMENTS)
    assert vtt.startswith("WEBVTT\n\n00:00.000 --> 00:02.000\n") and "59:59.500 --> 01:02:05.125" in vtt
