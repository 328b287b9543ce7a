"""Silero VAD through onnxruntime vs the silero-vad package's own segmenter, batch and streamed."""

from __future__ import annotations

import numpy as np
import pytest

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.audio.synth import SENTENCES, have_espeak, synthesize
from edge_mmm.audio.vad import (VAD_CHUNK, SileroVad, VadEvent, VADIterator, VadOptions, events_to_segments,
                                speech_segments)
from edge_mmm.errors import InputError


@pytest.fixture(scope="module")
def two_utterances(tmp_path_factory):
    """1.5 s silence + sentence + 2.0 s silence + sentence + 1.0 s silence, and the sentences' spans."""
    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    from edge_mmm.audio.io import load_audio

    out = tmp_path_factory.mktemp("vad")
    a = load_audio(synthesize(SENTENCES[6], out / "a.wav"))
    b = load_audio(synthesize(SENTENCES[5], out / "b.wav"))
    sil = lambda s: np.zeros(int(s * SAMPLE_RATE), np.float32)  # noqa: E731
    audio = np.concatenate([sil(1.5), a, sil(2.0), b, sil(1.0)])
    t_b = 1.5 + (len(a) / SAMPLE_RATE) + 2.0
    return audio, [(1.5, 1.5 + len(a) / SAMPLE_RATE), (t_b, t_b + len(b) / SAMPLE_RATE)]


@pytest.fixture(scope="module")
def model():
    return SileroVad()


def test_segments_match_silero_package(two_utterances, model):
    torch = pytest.importorskip("torch")
    silero_vad = pytest.importorskip("silero_vad")
    audio, truth = two_utterances
    ref_model = silero_vad.load_silero_vad(onnx=True)
    ref = silero_vad.get_speech_timestamps(torch.from_numpy(audio), ref_model, sampling_rate=SAMPLE_RATE)
    ref = [(r["start"] / SAMPLE_RATE, r["end"] / SAMPLE_RATE) for r in ref]
    ours = speech_segments(audio, model=model)
    assert len(ours) == len(ref) == 2, (ours, ref)
    for (s, e), (rs, re_) in zip(ours, ref):
        assert abs(s - rs) <= 0.1 and abs(e - re_) <= 0.1, (ours, ref)  # measured: identical samples
    # and the segments cover the spoken sentences (espeak's own trailing silence may be cut)
    for (s, e), (ts, te) in zip(ours, truth):
        assert abs(s - ts) < 0.25 and ts < e <= te + 0.1, (ours, truth)


@pytest.mark.parametrize("piece", [VAD_CHUNK, 1000, 16000 // 3])
def test_stream_equals_batch(two_utterances, model, piece):
    audio, _ = two_utterances
    batch_it = VADIterator(model=model)
    batch = batch_it.feed(audio) + batch_it.flush()
    it = VADIterator(model=model)
    streamed, when = [], []
    for i in range(0, len(audio), piece):
        for ev in it.feed(audio[i:i + piece]):
            streamed.append(ev)
            when.append(it.n_samples)
    streamed += it.flush()
    assert streamed == batch
    assert [e.kind for e in streamed] == ["start", "end", "start", "end"]
    # events come while the audio is streaming, not at the end: each end event is reported within
    # min_silence + one chunk + one piece of its (unpadded) end
    ends = [(ev, t) for ev, t in zip(streamed, when) if ev.kind == "end"]
    assert len(ends) == 2
    for ev, t in ends:
        unpadded = ev.sample - int(0.030 * SAMPLE_RATE)
        assert t - unpadded <= 0.1 * SAMPLE_RATE + 2 * VAD_CHUNK + piece
    assert events_to_segments(streamed, len(audio)) == speech_segments(audio, model=model)


def test_silence_and_short_click(model):
    silence = np.zeros(3 * SAMPLE_RATE, np.float32)
    assert speech_segments(silence, model=model) == []
    rng = np.random.default_rng(0)
    click = silence.copy()
    click[SAMPLE_RATE:SAMPLE_RATE + 800] = rng.uniform(-0.9, 0.9, 800)  # 50 ms burst < min_speech
    assert speech_segments(click, model=model) == []


def test_options_validated():
    with pytest.raises(InputError, match="threshold"):
        VadOptions(threshold=1.5)
    with pytest.raises(InputError, match="speech_pad_ms"):
        VadOptions(min_silence_ms=40, speech_pad_ms=30)
    assert VadOptions(threshold=0.6).neg_threshold == pytest.approx(0.45)
    with pytest.raises(InputError, match="512"):
        SileroVad()(np.zeros(100, np.float32))


def test_stream_ending_in_a_pause_ends_where_the_pause_began(two_utterances, model):
    """A file that stops 0.25 s into the silence after its last word: `flush(at_pause=True)` (the live
    segmenter's) ends the segment where a live endpoint (the same audio followed by enough silence) ends it;
    the default ends it at the last sample, as silero-vad's get_speech_timestamps does; a stream cut inside
    the speech ends at its last sample either way."""
    audio, truth = two_utterances
    opts = VadOptions(min_silence_ms=500)

    def events(x, at_pause=True):
        it = VADIterator(opts, model)
        return it.feed(x) + it.flush(at_pause=at_pause)

    first = audio[:int((truth[0][1] + 1.0) * SAMPLE_RATE)]
    live = events(first)
    assert [e.kind for e in live] == ["start", "end"]
    silence_from = live[1].sample - int(opts.speech_pad_ms * SAMPLE_RATE / 1000)
    cut = silence_from + int(0.25 * SAMPLE_RATE)  # 0.25 s into the silence: no endpoint yet
    flushed = events(audio[:cut])
    assert flushed == live
    assert events(audio[:cut], at_pause=False) == [live[0], VadEvent("end", cut)]
    inside = int((truth[0][0] + 0.6) * SAMPLE_RATE)  # mid-sentence
    for at_pause in (True, False):
        ends = [e for e in events(audio[:inside], at_pause) if e.kind == "end"]
        assert [e.sample for e in ends] == [inside]


def test_end_pause_ends_where_the_full_wait_would(two_utterances, model):
    """`VADIterator.end_pause()` inside a pause (the early endpoint): the same end event, at the same sample,
    as waiting out `min_silence_ms`; the next speech starts a new segment; nothing outside a pause."""
    audio, truth = two_utterances
    first_end = int((truth[0][1] + 0.25) * SAMPLE_RATE)  # 250 ms into the pause after the first sentence

    def run(early: bool):
        it = VADIterator(VadOptions(min_silence_ms=1000), model)
        events, ended_early = [], False
        for i in range(0, audio.size, VAD_CHUNK):
            events += it.feed(audio[i:i + VAD_CHUNK])
            if early and not ended_early and i + VAD_CHUNK >= first_end:
                assert it.silence_from is not None  # inside the pause
                events += it.end_pause()
                ended_early = True
                assert it.end_pause() == []  # the segment is closed: nothing more to end
        return events + it.flush()

    waited, early = run(False), run(True)
    assert [(e.kind, e.sample) for e in early] == [(e.kind, e.sample) for e in waited]
    assert [e.kind for e in early] == ["start", "end", "start", "end"]
    fresh = VADIterator(VadOptions(), model)
    assert fresh.end_pause() == []  # no speech, no pause


def test_pending_start_is_the_speech_not_yet_reported(two_utterances, model):
    """`pending_start` (the live assistant's continuation window waits on it): from the first voiced chunk until
    the start event it is that chunk's sample, which the start event then reports less the padding; None in
    silence and once the start is out."""
    audio, _ = two_utterances
    it = VADIterator(VadOptions(), model)
    pad = SAMPLE_RATE * it.options.speech_pad_ms // 1000
    seen = []
    for i in range(0, audio.size, VAD_CHUNK):
        pending_before = it.pending_start
        events = it.feed(audio[i:i + VAD_CHUNK])
        if it.pending_start is not None:
            seen.append(it.pending_start)
        for ev in events:
            if ev.kind == "start":
                assert pending_before is not None and ev.sample == max(0, pending_before - pad)
                assert it.pending_start is None
                seen.append(("start", ev.sample))
    starts = [s for s in seen if isinstance(s, tuple)]
    assert len(starts) == 2 and len(seen) > 2  # both sentences were pending for a while before their start
    assert VADIterator(VadOptions(), model).pending_start is None
