"""Synthesized test speech is reproducible: the same arguments give the same samples."""

import pytest

from edge_mmm.audio.synth import have_espeak, synthesize


def test_the_same_sentence_synthesizes_to_the_same_bytes(tmp_path):
    """sox's default dither added fresh noise to every synthesis (different bytes each time), enough to change
    a quantized Whisper's words between benchmark runs; resampled without dither, two runs are identical."""
    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    a = synthesize("The robot picked up the blue box.", tmp_path / "a.wav", voice="en-gb", lead_silence=0.3)
    b = synthesize("The robot picked up the blue box.", tmp_path / "b.wav", voice="en-gb", lead_silence=0.3)
    assert a.read_bytes() == b.read_bytes()
    assert len(a.read_bytes()) > 16000  # speech, not an empty file
