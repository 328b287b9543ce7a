"""Our whole `transcribe` (the 30 s window loop, seeking by timestamps, segments, prompts) vs openai-whisper's
`transcribe()` on the same weights, over ~50 s of speech (two and more windows).

Greedy at temperature 0 (sampling draws from different random streams); with and without conditioning on the
previous window's text, with and without an initial prompt. Tolerance: identical segment tokens and text,
segment times within 1 ms (ours are rounded to 1 ms).
"""

from __future__ import annotations

import numpy as np
import pytest

whisper = pytest.importorskip("whisper")

from edge_mmm.asr.api import load_asr  # noqa: E402
from edge_mmm.asr.transcribe import TranscribeOptions  # noqa: E402
from edge_mmm.audio.constants import SAMPLE_RATE  # noqa: E402

PROMPT = "Notes from the Tuesday call with Dr. Okonkwo about the Zurich office."


@pytest.fixture(scope="module")
def long_audio(speech_clips):
    """The eight clips, 0.4 s of silence between them, then again in reverse order: ~50 s."""
    gap = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    order = list(speech_clips) + list(reversed(speech_clips))
    audio = np.concatenate([part for _, _, a in order for part in (a, gap)])
    assert len(audio) / SAMPLE_RATE > 35
    return audio


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def ours(request, tiny_en_dir, tmp_path_factory):
    return load_asr(tiny_en_dir, backend=request.param, cache_dir=tmp_path_factory.mktemp("asr-cache"))


@pytest.mark.parametrize("condition", [False, True], ids=["independent-windows", "conditioned"])
@pytest.mark.parametrize("prompt", [None, PROMPT], ids=["no-prompt", "initial-prompt"])
def test_long_form_matches_openai_whisper(openai_model, ours, long_audio, condition, prompt):
    ref = openai_model.transcribe(long_audio, language="en", temperature=0.0, fp16=False,
                                  condition_on_previous_text=condition, initial_prompt=prompt)
    got = ours.transcribe(long_audio, TranscribeOptions(temperatures=(0.0,), condition_on_previous_text=condition,
                                                        initial_prompt=prompt))
    assert len(ref["segments"]) > 2 and ref["segments"][-1]["end"] > 30  # more than one window was decoded
    assert [s.tokens for s in got.segments] == [s["tokens"] for s in ref["segments"]]
    assert [s.text for s in got.segments] == [s["text"] for s in ref["segments"]]
    assert np.allclose([(s.start, s.end) for s in got.segments],
                       [(s["start"], s["end"]) for s in ref["segments"]], atol=1e-3)
    assert got.text == ref["text"].strip()


def test_initial_prompt_reaches_the_decoder(ours, speech_clips):
    """The prompt is really fed: the first window's log-probability changes with it (the words may not)."""
    _, _, audio = speech_clips[0]
    plain = ours.transcribe(audio, TranscribeOptions(temperatures=(0.0,)))
    prompted = ours.transcribe(audio, TranscribeOptions(temperatures=(0.0,), initial_prompt=PROMPT))
    assert plain.segments[0].avg_logprob != prompted.segments[0].avg_logprob



def test_cli_condition_flag(long_audio, tiny_en_dir, tmp_path, capsys):
    """`edge-mmm transcribe --condition-on-previous-text` decodes as `condition_on_previous_text=True`."""
    import json
    import wave

    from edge_mmm.audio.io import load_audio
    from edge_mmm.cli import main

    path = tmp_path / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(long_audio, -1, 1) * 32767).astype(np.int16).tobytes())
    audio = load_audio(path)
    ours = load_asr(tiny_en_dir)  # the CLI's default backend, from the same export cache
    for flag, condition in (("--condition-on-previous-text", True), ("--independent-windows", False)):
        code = main(["transcribe", str(path), "--model", str(tiny_en_dir), "--json", flag])
        out, _ = capsys.readouterr()
        want = ours.transcribe(audio, TranscribeOptions(condition_on_previous_text=condition))
        assert code == 0 and json.loads(out)["text"] == want.text, flag
