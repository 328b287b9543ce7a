"""The --speak part of benchmarks/live.py: a speaker per conversation (espeak-ng into a real-time paced
RecordingSink, so "first audio out" is the time the first answer sample was played) and the wait for it."""

from __future__ import annotations

import queue
import time


def make_speaker():
    from edge_mmm.speech_out.playback import RecordingSink
    from edge_mmm.speech_out.speaker import Speaker
    from edge_mmm.speech_out.tts import EspeakTts

    return Speaker(EspeakTts(), RecordingSink())


def wait_spoken(assistant, q, turn, timeout: float) -> dict:
    """Wait for the turn's `speech_out` timing and for its audio to be played out; its first_audio_s etc."""
    deadline = time.monotonic() + timeout
    out = {}
    while not out and time.monotonic() < deadline:
        try:
            e = q.get(timeout=0.2)
        except queue.Empty:
            continue
        if e.type == "timing" and e.data.get("stage") == "speech_out" and e.data.get("turn") == turn:
            out = {"first_audio_s": e.data.get("eos_to_first_audio_s"),
                   "first_token_to_audio_s": e.data["first_token_to_audio_s"]}
    if not out:
        raise RuntimeError(f"turn {turn}: no audio was played within {timeout} s")
    speaker = assistant.voice.speaker
    speaker.wait_done(max(0.0, deadline - time.monotonic()))
    time.sleep(speaker.config.echo.tail_s)  # the next question is not spoken into the echo gate's tail
    return out
