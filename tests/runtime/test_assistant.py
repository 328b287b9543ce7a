"""LiveAssistant in process, with models shared by the session: the real Whisper tiny.en and the tiny random
Idefics3 (tests/tiny_idefics3.py; it loads in a second, so its answers are noise and only the mechanics are
checked; the real SmolLM2 text path is exercised end to end in test_cli_run.py). Typed turns and KV reuse,
barge-in by speech, scene reuse of the image embedding, audio overflow reporting, a failing microphone while
the camera goes on, and stop() joining every thread."""

import queue
import threading
import time

import numpy as np
import pytest


from edge_mmm.runtime.assistant import LiveAssistant, LiveConfig, model_kind  # noqa: E402
from edge_mmm.runtime.retry import Backoff  # noqa: E402

skdata = pytest.importorskip("skimage.data")


def _events(q, until, timeout=60.0):
    """Collect events until `until(events)` holds."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out.append(q.get(timeout=0.1))
        except queue.Empty:
            continue
        if until(out):
            return out
    raise AssertionError(f"timed out; got {[e.type for e in out]}")


def _done(n):
    return lambda evs: sum(e.type == "timing" and e.data.get("stage") == "turn" for e in evs) >= n


def _turns(evs):
    return [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "turn"]


def _bgr(name, size=96):
    img = getattr(skdata, name)()[:, :, ::-1]
    step = max(1, min(img.shape[:2]) // size)
    return np.ascontiguousarray(img[::step, ::step][:size, :size])


def test_model_kind(tiny_vlm_dir, tmp_path):
    assert model_kind(tiny_vlm_dir) == "vlm"
    assert model_kind(tmp_path / "model.gguf") == "lm"


def test_typed_questions_stream_and_reuse_history_kv(vlm_models):
    a = LiveAssistant(LiveConfig(max_tokens=12), vlm_models)
    q = a.subscribe()
    a.start()
    try:
        a.ask_text("What is the capital of France?")
        evs = _events(q, _done(1))
        a.ask_text("And of Germany?")
        evs += _events(q, _done(1))
    finally:
        assert a.stop()
    first, second = _turns(evs)
    deltas = [e.data["text"] for e in evs if e.type == "answer.delta" and e.data["turn"] == 1]
    done = [e.data for e in evs if e.type == "answer.done"]
    assert len(deltas) >= 2 and "".join(deltas) == done[0]["text"]
    assert first["frame"] == "none" and first["vision_s"] == 0  # no camera, no frame: a text-only prompt
    assert first["prompt_reused"] == 0
    assert second["prompt_reused"] >= first["prompt_tokens"]  # the first exchange came from the KV cache
    assert second["prefill_s"] > 0 and second["ttft_s"] >= second["prefill_s"]
    assert a.turns.history[-2]["content"] == [{"type": "text", "text": "And of Germany?"}]


def test_speech_barges_in_on_a_long_answer(vlm_models, question_clip, monkeypatch):
    from dataclasses import replace

    from edge_mmm.audio.io import load_audio

    from conftest import QUESTION
    from wer import normalized_wer

    # the tiny random VLM's greedy answer repeats itself within ~70 tokens, which the live loop check ends in
    # ~0.1 s on a fast CPU, before the fed speech is heard: the answer must outlast that here
    generation = LiveConfig.generation
    monkeypatch.setattr(LiveConfig, "generation", lambda self: replace(generation(self), stop_loops=False))
    a = LiveAssistant(LiveConfig(max_tokens=1500), vlm_models)
    q = a.subscribe(maxsize=4096)
    a.start()
    try:
        a.ask_text("Write a very long story about a dragon who learns to cook.")
        _events(q, lambda evs: sum(e.type == "answer.delta" for e in evs) >= 3)
        a.feed_audio(load_audio(question_clip))  # the user starts talking over the answer
        evs = _events(q, _done(2), timeout=120)
    finally:
        assert a.stop()
    done = [e.data for e in evs if e.type == "answer.done"]
    assert done[0]["cancelled"] and done[0]["finish_reason"] == "cancelled"
    assert any(e.type == "notice" and "barge-in" in e.data["message"] for e in evs)
    final = [e.data for e in evs if e.type == "transcript.final"]
    assert normalized_wer(QUESTION, final[0]["text"]) <= 0.25
    assert not done[1]["cancelled"] and done[1]["question"] == final[0]["text"]
    speech_turn = _turns(evs)[-1]
    assert speech_turn["source"] == "speech" and speech_turn["asr_final_s"] > 0
    assert speech_turn["eos_to_first_token_s"] > 0


def test_unchanged_scene_reuses_image_embedding_and_kv(vlm_models):
    """Tiny random VLM: only the mechanics (vision encoder skipped, image tokens reused) are checked."""
    a = LiveAssistant(LiveConfig(max_tokens=6), vlm_models)
    q = a.subscribe()
    a.start()
    rng = np.random.default_rng(0)
    try:
        cat = _bgr("chelsea")
        a.feed_frame(cat)
        a.ask_text("What is this?")
        evs = _events(q, _done(1))
        noisy = np.clip(cat.astype(np.int16) + rng.integers(-4, 5, cat.shape), 0, 255).astype(np.uint8)
        a.feed_frame(noisy)  # same scene, new sensor noise
        a.ask_text("What colour is it?")
        evs += _events(q, _done(1))
        a.feed_frame(_bgr("coffee"))  # the scene changes
        a.ask_text("And now?")
        evs += _events(q, _done(1))
    finally:
        assert a.stop()
    t1, t2, t3 = _turns(evs)
    assert t1["scene_changed"] and t1["vision_s"] > 0 and t1["image_cache_hit"] == 0
    assert not t2["scene_changed"] and t2["vision_s"] == 0 and t2["image_cache_hit"] == 1
    assert t2["prompt_reused"] >= t1["prompt_tokens"]  # history with its image tokens came from the KV cache
    assert t3["scene_changed"] and t3["vision_s"] > 0 and t3["image_cache_hit"] == 0
    assert t3["prompt_reused"] < t2["prompt_reused"]  # the old image left the history: re-prefilled


def test_audio_overflow_is_reported(vlm_models):
    a = LiveAssistant(LiveConfig(ring_capacity_s=0.5), vlm_models)
    q = a.subscribe()
    a.feed_audio(np.zeros(16000 * 2, np.float32))  # 2 s into a 0.5 s ring before anything reads it
    a.start()
    try:
        evs = _events(q, lambda evs: any(e.type == "error" for e in evs), timeout=10)
    finally:
        assert a.stop()
    err = [e.data for e in evs if e.type == "error"][0]
    assert err["source"] == "audio" and err["samples_lost"] == 16000 * 2 - 8000 and "overflow" in err["message"]


def test_failing_microphone_is_retried_while_camera_and_answers_go_on(vlm_models, video_file, monkeypatch):
    # a microphone that fails once the stream opens (the check at start, against PortAudio's list, is
    # tests/runtime/test_microphone.py's: on a host with a sound server running it refuses device 57 at once)
    import edge_mmm.runtime.inputs as inputs

    monkeypatch.setattr(inputs, "check_microphone", lambda device: None)
    cfg = LiveConfig(camera=str(video_file), mic="57", max_tokens=4, backoff=Backoff(0.05, 2.0, 0.4))
    a = LiveAssistant(cfg, vlm_models)
    q = a.subscribe(maxsize=1000)
    before = set(threading.enumerate())
    a.start()
    try:
        mic_errors = lambda evs: [e.data for e in evs if e.type == "error" and e.data["source"] == "microphone"]  # noqa: E731
        evs = _events(q, lambda evs: len(mic_errors(evs)) >= 3, timeout=20)
        deadline = time.monotonic() + 10
        while a.latest_frame_jpeg() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.latest_frame_jpeg()[:2] == b"\xff\xd8"
        a.ask_text("What do you see?")
        evs += _events(q, _done(1))
    finally:
        assert a.stop(timeout=1.0)
    errs = mic_errors(evs)
    assert [e["retry_in_s"] for e in errs[:3]] == [0.05, 0.1, 0.2]
    assert "57" in errs[0]["message"] or "device" in errs[0]["message"].lower()
    turn = _turns(evs)[0]
    assert turn["vision_s"] > 0 and "frame_age_s" in turn  # the camera frame was used
    assert all(not t.is_alive() for t in a.threads)
    leftover = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("edge-mmm")]
    assert not leftover


def test_the_audio_file_plays_while_the_models_load_and_stops_if_they_fail(monkeypatch, question_clip):
    """With no models given, the sources start before the load (a question asked meanwhile waits in the ring
    and is answered once the models are ready); a load that fails stops them again."""
    import edge_mmm.runtime.assistant as assistant_mod
    from edge_mmm.errors import ModelFileError

    heard = []

    def load(config):  # the file is already playing into the ring while the models "load"
        deadline = time.monotonic() + 10
        while not any(t.name == "edge-mmm-audio-file" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        heard.append([t.name for t in threading.enumerate()])
        raise ModelFileError("no model here")

    monkeypatch.setattr(assistant_mod, "load_live_models", load)
    with pytest.raises(ModelFileError, match="no model here"):
        LiveAssistant(LiveConfig(mic=str(question_clip)))
    assert "edge-mmm-audio-file" in heard[0]
    assert not any(t.name == "edge-mmm-audio-file" and t.is_alive() for t in threading.enumerate())


def test_a_question_asked_while_the_models_load_is_answered(monkeypatch, vlm_models, question_clip):
    """The whole question file plays (at 4x) before the "load" returns: it waits in the ring and becomes the
    first turn once the assistant starts; its end of speech -> first token includes the rest of the load."""
    import edge_mmm.runtime.assistant as assistant_mod

    waited = []

    def load(config):
        file_thread = [t for t in threading.enumerate() if t.name == "edge-mmm-audio-file"][0]
        file_thread.join(20)
        waited.append(time.monotonic())
        time.sleep(0.3)
        return vlm_models

    monkeypatch.setattr(assistant_mod, "load_live_models", load)
    a = LiveAssistant(LiveConfig(mic=str(question_clip), audio_file_speed=4.0, max_tokens=4, once=True))
    q = a.subscribe(maxsize=10_000)
    a.start()
    try:
        evs = _events(q, _done(1), timeout=120)
    finally:
        assert a.stop()
    final = [e.data for e in evs if e.type == "transcript.final"]
    assert len(final) == 1 and "red car" in final[0]["text"].lower()
    assert waited and _turns(evs)[0]["eos_to_first_token_s"] > 0.3  # the speech ended before the load did


def test_audio_dropped_during_a_long_load_is_a_notice(monkeypatch, vlm_models, question_clip):
    """A load longer than the ring holds (0.5 s here): the audio lost meanwhile is said once as a notice about
    the load, not reported as speech recognition falling behind."""
    import edge_mmm.runtime.assistant as assistant_mod

    def load(config):
        [t for t in threading.enumerate() if t.name == "edge-mmm-audio-file"][0].join(20)
        return vlm_models

    monkeypatch.setattr(assistant_mod, "load_live_models", load)
    a = LiveAssistant(LiveConfig(mic=str(question_clip), audio_file_speed=8.0, ring_capacity_s=0.5, max_tokens=4))
    q = a.subscribe(maxsize=10_000)
    a.start()
    try:
        evs = _events(q, lambda evs: any(e.type == "notice" and "while the models loaded" in e.data["message"]
                                         for e in evs), timeout=30)
    finally:
        assert a.stop()
    notice = [e.data["message"] for e in evs if e.type == "notice" and "models loaded" in e.data["message"]][0]
    assert "dropped (the buffer keeps the last 0.5 s)" in notice
    assert not [e for e in evs if e.type == "error" and e.data.get("source") == "audio"]


def test_history_is_cut_to_half_the_window_when_full(vlm_models):
    a = LiveAssistant(LiveConfig(max_tokens=2, max_history_turns=4), vlm_models)
    q = a.subscribe()
    a.start()
    sizes, reused = [], []
    try:
        for i in range(6):
            a.ask_text(f"Question number {i}?")
            reused.append(_turns(_events(q, _done(1)))[0]["prompt_reused"])
            sizes.append(len(a.turns.history) // 2)
    finally:
        assert a.stop()
    assert sizes == [1, 2, 3, 4, 2, 3]  # the fifth exchange overflows 4: the newest 2 stay
    assert reused[1] > 0 and reused[2] > reused[1] and reused[3] > reused[2]  # the prefix is reused until a cut
    assert reused[5] > 0  # and again after it


def test_live_models_load_whisper_beside_the_lm_and_report_either_error(monkeypatch, tmp_path):
    """Whisper loads on its own thread while the LM loads; a bad path for either is the typed error that names it."""
    import edge_mmm.asr.api as asr_api
    import edge_mmm.text.api as text_api
    from edge_mmm.errors import ModelFileError
    from edge_mmm.runtime.assistant import load_live_models

    seen = {}
    both = threading.Barrier(2, timeout=10)  # broken (an error) unless the two loads run at the same time

    def fake_asr(model, backend, threads):
        seen["asr"] = threading.current_thread().name
        both.wait()
        if model == "bad":
            raise ModelFileError("whisper 'bad' not found")
        return "asr"

    def fake_lm(path, **kwargs):
        seen["lm"] = threading.current_thread().name
        both.wait()
        return "lm"

    monkeypatch.setattr(asr_api, "load_asr", fake_asr)
    monkeypatch.setattr(text_api, "load_lm", fake_lm)
    lm = tmp_path / "lm.gguf"
    lm.write_bytes(b"GGUF")
    models = load_live_models(LiveConfig(model=str(lm)))
    assert (models.asr, models.lm) == ("asr", "lm") and seen["asr"] != seen["lm"]
    both.reset()
    with pytest.raises(ModelFileError, match="whisper 'bad'"):
        load_live_models(LiveConfig(model=str(lm), asr_model="bad"))
    with pytest.raises(ModelFileError, match="missing.gguf"):
        load_live_models(LiveConfig(model=str(tmp_path / "missing.gguf")))


def test_live_answers_stop_when_they_loop():
    """The live assistant's generation ends a looping answer (`tests/text/test_loop_stop.py`); chat does not."""
    from edge_mmm.text.generation import GenerationConfig

    assert LiveConfig().generation().stop_loops and not GenerationConfig().stop_loops
