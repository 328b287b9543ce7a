"""Whisper decoding with a draft (the previous hypothesis, as the live recognizer has): the same tokens as
without one, in fewer decoder calls. Real tiny.en weights on espeak-ng clips."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_mmm.asr.transcribe import TranscribeOptions

GREEDY = TranscribeOptions(temperatures=(0.0,))


@pytest.fixture(scope="module")
def asr(tiny_en_dir):
    from edge_mmm.asr.api import load_asr

    return load_asr(tiny_en_dir, threads=2)


def _counting(monkeypatch, backend):
    calls = []
    real = backend.step

    def step(state, tokens):
        calls.append(tokens.shape[1])
        return real(state, tokens)

    monkeypatch.setattr(backend, "step", step)
    return calls


def _same(a, b):
    assert a.tokens == b.tokens and a.text == b.text
    for x, y in zip(a.segments, b.segments):
        assert (x.start, x.end) == (y.start, y.end)
        assert abs(x.avg_logprob - y.avg_logprob) < 1e-4 and abs(x.no_speech_prob - y.no_speech_prob) < 1e-5


def test_any_draft_gives_the_tokens_of_plain_greedy_decoding(asr, speech_clips, monkeypatch):
    rng = np.random.default_rng(7)
    for k, (_, _, audio) in enumerate([speech_clips[1], speech_clips[6]]):
        calls = _counting(monkeypatch, asr.backend)
        ref = asr.transcribe(audio, GREEDY)
        plain_calls = len(calls)
        assert plain_calls > 5 and ref.tokens
        start = asr.transcribe(audio[: int(0.6 * len(audio))], GREEDY).tokens  # what a partial pass had
        corrupt = list(ref.tokens)
        corrupt[len(corrupt) // 2] = 440
        drafts = {"start": start, "whole": ref.tokens, "corrupt": corrupt}
        if k == 0:
            drafts.update({"noise": rng.integers(0, 50257, size=30).tolist(), "too long": ref.tokens * 30,
                           "out of vocabulary": ref.tokens[:3] + [10**6, -1] + ref.tokens[3:]})
        for name, draft in drafts.items():
            calls.clear()
            got = asr.transcribe(audio, GREEDY, draft=draft)
            _same(got, ref)
            if name == "whole":  # checked and ended (<|endoftext|>) in the one call
                assert len(calls) == 1 and calls[0] > len(got.tokens), (name, calls)
            if name in ("start", "corrupt"):
                assert len(calls) < plain_calls, (name, calls, plain_calls)
    beam = TranscribeOptions(temperatures=(0.0,), beam_size=3)  # a draft is for greedy decoding only
    audio = speech_clips[1][2]
    _same(asr.transcribe(audio, beam, draft=corrupt), asr.transcribe(audio, beam))


def test_draft_on_the_torch_backend(tiny_en_dir, speech_clips):
    from edge_mmm.asr.api import load_asr

    model = load_asr(tiny_en_dir, backend="torch", threads=2)
    audio = speech_clips[2][2]
    ref = model.transcribe(audio, GREEDY)
    corrupt = list(ref.tokens)
    corrupt[-3] = 1000
    _same(model.transcribe(audio, GREEDY, draft=corrupt), ref)


def test_a_pass_stops_when_another_thread_cancels_it(asr, speech_clips):
    """`ASRModel.interruptible()`: another thread's `cancel()` stops the running onnxruntime pass within a
    kernel (PassInterrupted); the next pass, outside the block or in a new one, runs normally."""
    import threading
    import time

    from edge_mmm.asr.backends import PassInterrupted

    audio = np.concatenate([c[2] for c in speech_clips[:4]])  # ~15 s: a pass of well over half a second
    ref = asr.transcribe(audio, GREEDY)
    with asr.interruptible() as handle:
        assert handle.supported
        threading.Timer(0.15, handle.cancel).start()
        t0 = time.perf_counter()
        with pytest.raises(PassInterrupted):
            asr.transcribe(audio, GREEDY)
        stopped = time.perf_counter() - t0
    assert stopped < 0.15 + 0.4, stopped  # the encoder alone takes ~0.4 s here; a stop waits for one kernel
    assert asr.transcribe(audio, GREEDY).tokens == ref.tokens
    with asr.interruptible() as handle:  # a fresh handle: the old cancel does not carry over
        assert asr.transcribe(audio, GREEDY).tokens == ref.tokens


def test_recognizer_drops_a_partial_pass_interrupted_at_a_pause(asr, speech_clips):
    """`interrupt_partial()` stops a running partial pass (the recognizer goes on as if it had not run), but not
    the utterance's first partial and not two in a row; the pause's pass then runs as usual."""
    import threading

    from edge_mmm.asr.streaming import SpeechEvent, UtteranceRecognizer

    rec = UtteranceRecognizer(asr)

    def step_while_interrupting():
        told = []
        timer = threading.Timer(0.1, lambda: told.append(rec.interrupt_partial()))
        timer.start()
        out = rec.step()
        timer.join()
        return [e.kind for e in out], told

    first, second = speech_clips[0][2], speech_clips[1][2]
    assert not rec.interrupt_partial()  # nothing running
    rec.push([SpeechEvent("start", 0), SpeechEvent("audio", 0, audio=first)])
    assert step_while_interrupting() == (["partial"], [False])  # the first partial is always shown
    rec.push([SpeechEvent("audio", len(first), audio=second)])
    assert step_while_interrupting() == ([], [True]) and rec.interrupted_passes == 1
    assert rec.has_work()  # the partial is still due; the pause's pass would run first if a pause came
    assert step_while_interrupting() == (["partial"], [False])  # not two in a row
    n = len(first) + len(second)
    rec.push([SpeechEvent("pause", n, speech_end=n)])
    rec.stt.options.speculate_after_s = 0.0
    spec = rec.step()
    assert [e.kind for e in spec] == ["speculative"] and spec[0].text.strip() and rec.interrupted_passes == 1


def test_speech_resuming_stops_the_pause_pass(asr, speech_clips):
    """`interrupt_speculative()` (the VAD thread, when speech resumes) stops the pause's running speculative
    pass: no event, no speculation kept; the resume then ends the pause, and the next pause's pass runs with a
    fresh handle. So a pass may start at the first silent chunk: a dip inside a word costs only the time to
    the next voiced chunk."""
    import threading

    from edge_mmm.asr.streaming import SpeechEvent, UtteranceRecognizer

    rec = UtteranceRecognizer(asr)
    assert asr.stoppable and rec.speculate_after_s == 0.03  # onnxruntime: the pass may start at the first silent chunk
    first, second = speech_clips[0][2], speech_clips[1][2]
    n = len(first)
    assert not rec.interrupt_speculative()  # nothing running
    rec.push([SpeechEvent("start", 0), SpeechEvent("audio", 0, audio=first),
              SpeechEvent("pause", n, speech_end=n - 480)])
    told = []
    timer = threading.Timer(0.1, lambda: told.append(rec.interrupt_speculative()))
    t0 = time.perf_counter()
    timer.start()
    out = rec.step()
    stopped = time.perf_counter() - t0
    timer.join()
    assert out == [] and told == [True] and rec.stopped_speculative_passes == 1 and rec.speculative_passes == 0
    assert stopped < 0.1 + 0.4, stopped  # one kernel after the cancel, not the whole pass
    assert rec.push([SpeechEvent("resume", n + 1600), SpeechEvent("audio", n, audio=second)]) == []  # nothing to drop
    m = n + len(second)
    rec.push([SpeechEvent("pause", m, speech_end=m - 480)])
    spec = rec.step()
    assert [e.kind for e in spec] == ["speculative"] and spec[0].text.strip() and rec.speculative_passes == 1
    final = rec.push([SpeechEvent("end", m, speech_end=m - 480)])
    assert final[0].reused and final[0].text == spec[0].text


def test_whisper_sessions_stop_spinning_when_a_run_returns(asr):
    """The encoder's and decoder's idle workers sleep once a run returns (onnxruntime's force_spinning_stop),
    so they do not take the cores of the decoder or the LM that runs next; the LM keeps spinning between its
    back-to-back decode steps. Timings in docs/speech.md."""
    for session in (s for s in (asr.backend.encoder, asr.backend.decoder) if s is not None):  # no decoder: C
        assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
