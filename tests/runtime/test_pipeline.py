"""The live turn as a pipeline: work done while the user speaks (real Whisper tiny.en, the tiny random Idefics3).
A scene change during speech re-encodes the frame once and the turn uses that encoding; a pause starts a
speculative final pass and question prefill that the resumed speech discards; the turn after a pause that
became the end reuses the speculative transcript and the prefilled prompt. The recognizer's pass decisions
are checked on their own with a scripted Whisper. Speeds are in benchmarks/live.py."""

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from edge_mmm.asr.streaming import SpeechEvent, UtteranceRecognizer
from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.errors import InputError
from edge_mmm.runtime.assistant import LiveAssistant, LiveConfig
from test_assistant import _events

skdata = pytest.importorskip("skimage.data")

BLOCK = 512  # samples per feed (32 ms), as a microphone delivers them


def _bgr(name, size=96):
    img = getattr(skdata, name)()[:, :, ::-1]
    step = max(1, min(img.shape[:2]) // size)
    return np.ascontiguousarray(img[::step, ::step][:size, :size])


def _speak(assistant, audio, stop):
    """Feed `audio` in real time, as a microphone would."""
    t0 = time.monotonic()
    for j in range(0, audio.size, BLOCK):
        if stop.is_set():
            return
        time.sleep(max(0.0, t0 + (j + BLOCK) / SAMPLE_RATE - time.monotonic()))
        assistant.feed_audio(audio[j:j + BLOCK])


@contextmanager
def _speaking(assistant, audio):
    """The user speaks `audio` in real time on a thread while the body runs; then the assistant stops."""
    stop = threading.Event()
    speaker = threading.Thread(target=_speak, args=(assistant, audio, stop), name="test-speaker")
    speaker.start()
    try:
        yield
    finally:
        stop.set()
        speaker.join()
        assert assistant.stop()


def _turn_done(evs):
    return any(e.type == "timing" and e.data.get("stage") == "turn" for e in evs)


def _spec(evs, step=None):
    return [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "speculative"
            and (step is None or e.data["step"] == step)]


@pytest.fixture
def fresh_vlm(vlm_models):
    """The session's VLM holds one conversation KV cache and an embedding cache: start and leave them empty,
    so other modules' tests see the fresh model they expect."""
    vlm_models.lm.cache.clear()
    vlm_models.lm.reset()
    yield
    vlm_models.lm.cache.clear()
    vlm_models.lm.reset()


@pytest.fixture(scope="module")
def paused_question(tmp_path_factory):
    """'Can you see the red car' + 1.2 s pause + 'parked next to the old building?', 2.2 s of silence after."""
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    d = tmp_path_factory.mktemp("paused")
    first = load_audio(synthesize("Can you see the red car", d / "a.wav", lead_silence=0.8))
    second = load_audio(synthesize("parked next to the old building?", d / "b.wav", trail_silence=2.2))
    return np.concatenate([first, np.zeros(int(1.2 * SAMPLE_RATE), np.float32), second])


@pytest.mark.usefixtures("fresh_vlm")
def test_scene_change_during_speech_reencodes_once(vlm_models, question_clip):
    from edge_mmm.audio.io import load_audio

    a = LiveAssistant(LiveConfig(max_tokens=4), vlm_models)
    q = a.subscribe(maxsize=10_000)
    a.feed_frame(_bgr("chelsea"))
    a.start()
    with _speaking(a, load_audio(question_clip)):
        evs = _events(q, lambda evs: bool(_spec(evs, "start")))
        first = _spec(evs, "start")[0]
        a.feed_frame(_bgr("coffee"))  # the camera now shows another scene, while the user still speaks
        evs += _events(q, _turn_done, timeout=120)
    assert first["encodes"] == 1 and first["scene_changed"] and first["prefix_tokens"] > 0
    scene = _spec(evs, "scene")
    assert len(scene) == 1 and scene[0]["encodes"] == 2  # re-encoded once, not again on every check
    turn = [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "turn"][0]
    assert turn["spec_encodes"] == 2 and turn["spec_frame_used"]
    assert turn["vision_s"] == 0 and turn["image_cache_hit"] == 1  # the turn found the new scene's embedding
    assert turn["prompt_reused"] >= turn["spec_prefix_tokens"]  # and its image tokens in the KV cache
    # the history holds the coffee frame: one image, the one encoded during speech
    images = [p["image"] for m in a.turns.history if isinstance(m["content"], list)
              for p in m["content"] if p.get("type") == "image"]
    assert len(images) == 1 and np.array_equal(images[0], _bgr("coffee"))


@pytest.mark.usefixtures("fresh_vlm")
def test_speech_resuming_after_a_pause_discards_the_speculative_pass_and_prefill(vlm_models, paused_question):
    """Whisper is a stand-in that answers at once (it says how much audio it heard), so the order of the
    passes does not depend on how busy the machine is; the VAD, the threads and the VLM are real."""
    from edge_mmm.runtime.assistant import LiveModels

    asr = _ScriptedASR()
    models = LiveModels(asr, vlm_models.lm, vlm_models.vad_path)
    # the end-silence wait (2 s) outlasts the pause (1.2 s): the pause must not end the turn
    a = LiveAssistant(LiveConfig(max_tokens=4, end_silence_ms=2000), models)
    q = a.subscribe(maxsize=10_000)
    a.start()
    with _speaking(a, paused_question):
        evs = _events(q, _turn_done, timeout=120)
    spec_asr = [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "speculative_asr"]
    # a pass at every pause (the pause, and the dips inside words: this stand-in answers at once, a real pass
    # is stopped by the next voiced chunk), each dropped when the speech resumed, and one at the end
    discarded = [s["discarded"] for s in spec_asr]
    assert discarded == [False, True] * (len(discarded) // 2) + [False]
    pause_pass = [s["audio_s"] for s in spec_asr if s["discarded"] and 1.5 < s["audio_s"] < 2.5]
    assert pause_pass and spec_asr[-1]["audio_s"] > 3.0  # the 1.2 s pause's pass was one of them
    steps = [s["step"] for s in _spec(evs)]
    assert steps == ["start"] + ["question", "discard"] * (len(discarded) // 2) + ["question"]
    finals = [e.data for e in evs if e.type == "transcript.final"]
    assert len(finals) == 1 and finals[0]["text"].endswith(str(int(spec_asr[-1]["audio_s"] * SAMPLE_RATE)))
    turn = [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "turn"][0]
    assert turn["spec_discarded"] == len(discarded) // 2 and turn["spec_question"]  # the final's prompt was prefilled
    assert turn["asr_reused"] and turn["asr_wait_s"] < turn["endpoint_s"]  # the end found the text ready
    assert turn["prompt_reused"] == turn["prompt_tokens"] - 1  # only the last token is computed at the turn
    assert a.turns.history[-2]["content"][-1]["text"] == finals[0]["text"]


class _ScriptedASR:
    """A Whisper stand-in that says how many samples it heard, to follow the recognizer's passes exactly."""

    def __init__(self):
        self.passes = []

    def transcribe(self, audio, options):
        self.passes.append(audio.size)

        class _T:
            text = f"heard {audio.size}"
        return _T()


class _FinishedSentenceASR(_ScriptedASR):
    """The stand-in, but every transcript reads as a finished question ("heard 12345?")."""

    def transcribe(self, audio, options):
        out = super().transcribe(audio, options)
        out.text += "?"
        return out


@pytest.mark.usefixtures("fresh_vlm")
@pytest.mark.parametrize("finished", [True, False])
def test_a_finished_sentence_ends_the_turn_after_the_shorter_silence(vlm_models, paused_question, finished):
    """`sentence_end_silence_ms` (opt-in): the 1.2 s pause ends the turn after 0.3 s of it when the pause's
    speculative text ends a sentence, and not at all when it does not (the 2 s end-silence wait holds); the
    final text is the speculative pass's (no new pass)."""
    from edge_mmm.runtime.assistant import LiveModels

    asr = _FinishedSentenceASR() if finished else _ScriptedASR()
    models = LiveModels(asr, vlm_models.lm, vlm_models.vad_path)
    a = LiveAssistant(LiveConfig(max_tokens=4, end_silence_ms=2000, sentence_end_silence_ms=300), models)
    q = a.subscribe(maxsize=10_000)
    a.start()
    with _speaking(a, paused_question):
        evs = _events(q, _turn_done, timeout=120)
    final = [e.data for e in evs if e.type == "transcript.final"][0]
    turn = [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "turn"][0]
    if finished:
        assert final["audio_s"] < 2.5 and final["text"].endswith("?")  # the first clause, up to the pause
        assert 0.25 < turn["endpoint_s"] < 0.8 and turn["asr_reused"]
    else:
        assert final["audio_s"] > 3.0  # both clauses: the pause did not end the turn
        assert turn["endpoint_s"] > 1.9


@pytest.mark.usefixtures("fresh_vlm")
@pytest.mark.parametrize("end_silence_ms", [2000, 800])
def test_speaking_on_after_an_early_endpoint_continues_the_question(vlm_models, paused_question, end_silence_ms):
    """The early endpoint ends 'heard N?' 0.3 s into the 1.2 s pause and it is answered; the speech goes on
    1.2 s after the pause began. Within the 2 s end-silence wait that continues the question: one question,
    both parts, is answered in the first one's place (its exchange withdrawn), and --once waits for it. With
    a 0.8 s wait the pause had ended the question anyway: two questions, and --once finished after the first."""
    from edge_mmm.runtime.assistant import LiveModels

    models = LiveModels(_FinishedSentenceASR(), vlm_models.lm, vlm_models.vad_path)
    a = LiveAssistant(LiveConfig(max_tokens=4, end_silence_ms=end_silence_ms, once=True), models)
    q = a.subscribe(maxsize=10_000)
    finished_at_second_start = []

    def second_turn(evs):
        for e in evs[-1:]:
            if e.type == "timing" and e.data.get("stage") == "speculative" and e.data["utterance"] == 2 \
                    and e.data["step"] == "start":
                finished_at_second_start.append(a.finished.is_set())
        return sum(e.type == "timing" and e.data.get("stage") == "turn" for e in evs) >= 2

    a.start()
    with _speaking(a, paused_question):
        evs = _events(q, second_turn, timeout=120)
        assert a.finished.wait(5)
    finals = [e.data for e in evs if e.type == "transcript.final"]
    turns = [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "turn"]
    first, second = finals
    assert first["text"].startswith("heard") and first["text"].endswith("?") and first["audio_s"] < 2.5
    assert 0.25 < turns[0]["endpoint_s"] < 0.8  # the early endpoint ended the first part
    user_questions = [m["content"][-1]["text"] for m in a.turns.history if m["role"] == "user"]
    if end_silence_ms == 2000:
        assert second["continues"] == first["utterance"] and second["text"].startswith(first["text"] + " Heard")
        assert turns[1]["continues"] == first["utterance"] and turns[1]["withdrew"]
        assert user_questions == [second["text"]]  # the first part's exchange is gone, the whole question stands
        assert finished_at_second_start == [False]  # --once waited: the question could still go on
    else:
        assert "continues" not in second and not second["text"].startswith(first["text"])
        assert "continues" not in turns[1]
        assert user_questions == [first["text"], second["text"]]
        assert finished_at_second_start == [True]  # the window had closed: --once was done with the first


def test_join_question():
    from edge_mmm.runtime.turns import join_question

    assert join_question("What is the capital of France?", "and what about Germany?") == \
        "What is the capital of France? And what about Germany?"
    assert join_question("Look at the", "red car.") == "Look at the red car."  # no sentence end: as written
    assert join_question(" Hi. ", "") == "Hi." and join_question("", "what?") == "what?"


def test_sentence_end_silence_is_checked():
    with pytest.raises(InputError, match="sentence_end_silence_ms"):
        LiveConfig(sentence_end_silence_ms=10)
    assert LiveConfig().sentence_end_silence_ms == 300  # on by default
    LiveConfig(end_silence_ms=200)  # a longer early endpoint than the wait changes nothing


def test_recognizer_drops_the_speculative_final_when_speech_resumes():
    asr = _ScriptedASR()
    rec = UtteranceRecognizer(asr)
    second = np.zeros(SAMPLE_RATE, np.float32)
    assert rec.push([SpeechEvent("start", 1000), SpeechEvent("audio", 1000, audio=second)]) == []
    assert [e.kind for e in rec.step()] == ["partial"] and asr.passes == [16000]
    assert not rec.interrupt_partial()  # no pass running (and this stand-in cannot be stopped anyway)
    rec.push([SpeechEvent("pause", 1000 + 12000, speech_end=1000 + 11520)])
    spec = rec.step()
    assert [e.kind for e in spec] == ["speculative"] and asr.passes[-1] == 12000 and spec[0].end_s == 12520 / 16000
    assert rec.step() == [] and not rec.has_work()  # one speculative pass per pause
    dropped = rec.push([SpeechEvent("resume", 1000 + 16000), SpeechEvent("audio", 17000, audio=second)])
    assert [e.kind for e in dropped] == ["discarded"] and dropped[0].committed == "heard 12000"
    assert [e.kind for e in rec.step()] == ["partial"]  # the speech went on: partials again
    rec.push([SpeechEvent("pause", 1000 + 30000, speech_end=1000 + 29520)])
    spec = rec.step()
    n_passes = len(asr.passes)
    final = rec.push([SpeechEvent("end", 1000 + 30000, speech_end=1000 + 29520)])
    assert len(asr.passes) == n_passes  # the speculative pass covered exactly the utterance: no final pass
    assert final[0].kind == "final" and final[0].reused and final[0].committed.endswith("30000")
    assert final[0].pass_t == spec[0].pass_t and rec.discarded_passes == 1 and rec.speculative_passes == 2


def test_the_pause_pass_waits_longer_when_the_asr_cannot_stop_it():
    """The pause's pass starts at the first silent chunk (0.03 s) only with an ASR whose passes a resume can
    stop (onnxruntime); otherwise a dip inside a word would cost a whole pass, so it waits for 0.1 s."""
    for stoppable, due_at in ((True, 0.03), (False, 0.1)):
        asr = _ScriptedASR()
        asr.stoppable = stoppable
        rec = UtteranceRecognizer(asr)
        assert rec.speculate_after_s == due_at
        rec.push([SpeechEvent("start", 0), SpeechEvent("audio", 0, audio=np.zeros(8000, np.float32)),
                  SpeechEvent("pause", 8000 + 480, speech_end=8000)])
        fed = 8000
        while not rec.has_work():
            rec.push([SpeechEvent("audio", fed, audio=np.zeros(512, np.float32))])
            fed += 512
        assert due_at <= (fed - 8000) / SAMPLE_RATE < due_at + 0.033
        assert [e.kind for e in rec.step()] == ["speculative"]


def test_recognizer_runs_the_final_pass_when_the_end_differs_from_the_pause():
    asr = _ScriptedASR()
    rec = UtteranceRecognizer(asr, speculate=False)
    rec.push([SpeechEvent("start", 0), SpeechEvent("audio", 0, audio=np.zeros(20000, np.float32)),
              SpeechEvent("pause", 15000, speech_end=14520)])
    assert rec.step() == [] and asr.passes == []  # no speculation: nothing runs during a pause
    final = rec.push([SpeechEvent("end", 15000, speech_end=14520)])
    assert asr.passes == [15000] and not final[0].reused and final[0].audio_s == 15000 / 16000


def test_recognizer_holds_partials_but_not_the_pause_pass():
    """`hold_partials` (the live runtime while a frame is encoded) defers partial passes, which resume over all
    the audio so far; the pause's speculative pass and the final pass are never held."""
    asr = _ScriptedASR()
    hold = [True]
    rec = UtteranceRecognizer(asr, hold_partials=lambda: hold[0])
    second = np.zeros(SAMPLE_RATE, np.float32)
    rec.push([SpeechEvent("start", 0), SpeechEvent("audio", 0, audio=second)])
    assert not rec.has_work() and rec.step() == [] and asr.passes == []
    rec.push([SpeechEvent("audio", 16000, audio=second)])
    assert rec.step() == [] and asr.passes == []
    hold[0] = False
    assert [e.kind for e in rec.step()] == ["partial"] and asr.passes == [32000]  # all the audio so far
    hold[0] = True
    rec.push([SpeechEvent("audio", 32000, audio=second), SpeechEvent("pause", 44000, speech_end=43520)])
    assert [e.kind for e in rec.step()] == ["speculative"] and asr.passes[-1] == 44000
    final = rec.push([SpeechEvent("end", 48000, speech_end=43520)])
    assert final[0].kind == "final" and asr.passes[-1] == 48000  # the end differs from the pause: a final pass


@pytest.mark.usefixtures("fresh_vlm")
def test_partials_wait_while_the_frame_is_encoded(vlm_models, question_clip, monkeypatch):
    """While the first frame is encoded during speech (made slow here), no partial Whisper pass starts; they
    resume after it. With `partials_during_vision=True` they run beside it."""
    from edge_mmm.audio.io import load_audio

    encoder = vlm_models.lm.encoder
    original = encoder.encode

    def slow_encode(*args, **kwargs):
        time.sleep(1.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "encode", slow_encode)

    def run(config):
        vlm_models.lm.cache.clear()
        vlm_models.lm.reset()
        a = LiveAssistant(config, vlm_models)
        q = a.subscribe(maxsize=10_000)
        a.feed_frame(_bgr("chelsea"))
        a.start()
        with _speaking(a, load_audio(question_clip)):
            evs = _events(q, _turn_done, timeout=120)
        start = [e for e in evs if e.type == "timing" and e.data.get("stage") == "speculative"
                 and e.data["step"] == "start"][0]
        began, ended = start.t - start.data["took_s"], start.t
        partial_starts = [e.t - e.data["asr_s"] for e in evs if e.type == "timing" and e.data.get("stage") == "asr"]
        during = [t for t in partial_starts if began + 0.05 < t < ended - 0.05]
        after = [t for t in partial_starts if t >= ended - 0.05]
        return start.data, during, after

    spec, during, after = run(LiveConfig(max_tokens=2))
    assert spec["encodes"] == 1 and spec["vision_s"] >= 1.4
    assert during == [] and after, (during, after)
    _, during, _ = run(LiveConfig(max_tokens=2, partials_during_vision=True))
    assert during, "partials ran beside the encoder when allowed"


def test_segmenter_reports_the_pause_going_on(question_clip):
    """`SpeechSegmenter.pause`: (first silent sample, seconds of silence) while a pause lasts, else None."""
    from edge_mmm.asr.streaming import SpeechSegmenter
    from edge_mmm.audio.io import load_audio

    seg = SpeechSegmenter()
    audio = load_audio(question_clip)
    seen, started = [], False
    for i in range(0, len(audio), 512):
        started |= any(e.kind == "start" for e in seg.feed(audio[i:i + 512]))
        if seg.pause is not None:
            seen.append(seg.pause)
    assert started and seen
    first, seconds = max(seen, key=lambda p: p[1])
    assert 0 < first < len(audio) and 0.1 < seconds < 1.0  # the end-silence wait ends the utterance at ~0.5 s
    assert seg.pause is None  # the utterance ended


def test_the_vad_thread_stops_a_partial_once_per_pause_after_the_threshold():
    import types

    calls = []
    a = object.__new__(LiveAssistant)  # the decision only: no models, no threads
    a.config = LiveConfig(interrupt_partial_after_s=0.3)
    a._recognizer = types.SimpleNamespace(interrupt_partial=lambda: calls.append(1) or True)
    seg = types.SimpleNamespace(pause=(16000, 0.2))
    assert a._interrupt_partial_at_pause(seg, None) is None and calls == []  # 0.2 s < 0.3 s: a gap between words
    seg.pause = (16000, 0.35)
    assert a._interrupt_partial_at_pause(seg, None) == 16000 and calls == [1]
    assert a._interrupt_partial_at_pause(seg, 16000) == 16000 and calls == [1]  # once per pause
    seg.pause = None
    assert a._interrupt_partial_at_pause(seg, 16000) == 16000 and calls == [1]
    a.config = LiveConfig(interrupt_partial_after_s=None)
    assert a._interrupt_partial_at_pause(types.SimpleNamespace(pause=(32000, 2.0)), 16000) == 16000 and calls == [1]
    a.config = LiveConfig()  # the default: the first silent VAD chunk (32 ms), when the pause's pass is due
    assert a._interrupt_partial_at_pause(types.SimpleNamespace(pause=(48000, 0.032)), 16000) == 48000 and calls == [1, 1]
    with pytest.raises(InputError, match="interrupt_partial_after_s"):
        LiveConfig(interrupt_partial_after_s=-1)


def test_audio_ending_in_a_pause_reuses_the_pause_pass_as_the_final(question_clip):
    """A question file that stops 0.3 s into the silence after it (espeak-ng, a trimmed recording): the end of
    the stream closes the utterance where the pause began, so the pause's speculative pass is the final
    transcript and no second pass runs (before, the final pass ran again over the whole file)."""
    from edge_mmm.asr.streaming import SpeechSegmenter
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.vad import VadOptions

    audio = load_audio(question_clip)
    probe = SpeechSegmenter(VadOptions(min_silence_ms=500))
    pauses = []
    for i in range(0, len(audio), BLOCK):
        probe.feed(audio[i:i + BLOCK])
        if probe.pause is not None:
            pauses.append(probe.pause[0])
    cut = pauses[-1] + int(0.3 * SAMPLE_RATE)  # the last pause, the one the endpoint ends
    asr = _ScriptedASR()
    seg, rec = SpeechSegmenter(VadOptions(min_silence_ms=500)), UtteranceRecognizer(asr)
    kinds = []
    for i in range(0, cut, BLOCK):
        rec.push(seg.feed(audio[i:min(i + BLOCK, cut)]))
        kinds += [e.kind for e in rec.step()]
    assert kinds[-1] == "speculative" and seg.pause is not None
    n_passes = len(asr.passes)
    final = rec.push(seg.flush())
    assert [e.kind for e in final] == ["final"] and final[0].reused and len(asr.passes) == n_passes


def test_the_end_of_the_input_closes_the_utterance_and_stops_a_running_partial():
    """`_input_end` (the VAD thread at an audio file's end): the segmenter's closing events go to the asr
    thread, a partial pass still running is stopped whatever the guards (the final pass covers it), and the
    notice says the file ended (and whether any speech was heard)."""
    import types

    heard, stopped = [], []
    a = object.__new__(LiveAssistant)  # the decision only: no models, no threads
    a._hear = lambda events, base, cap: heard.append((events, base))
    a._recognizer = types.SimpleNamespace(interrupt_partial=lambda always=False: stopped.append(always) or True)
    a._file_source = types.SimpleNamespace(path="q.wav")
    a._vad_utterance, a._input_ended, a._early_end, notices = 1, False, None, []
    a._notice = lambda source, message: notices.append((source, message))
    end = [SpeechEvent("end", 32000, speech_end=31520)]
    a._input_end(types.SimpleNamespace(flush=lambda: end), 7)
    assert heard == [(end, 7)] and stopped == [True] and a._input_ended
    assert notices == [("microphone", "audio file q.wav ended")]
    a._vad_utterance = 0
    a._input_end(types.SimpleNamespace(flush=lambda: []), 7)
    assert notices[-1] == ("microphone", "audio file q.wav ended: no speech was heard in it")


def test_the_vad_thread_stops_the_pause_pass_when_speech_resumes():
    """`_pass_on` (the VAD thread): the events go to the asr thread first, then a "resume" among them stops
    the pause's speculative pass (its text is void); other events stop nothing."""
    import types

    order = []
    a = object.__new__(LiveAssistant)  # the decision only: no models, no threads
    a._hear = lambda events, base, cap: order.append(("heard", [e.kind for e in events]))
    a._recognizer = types.SimpleNamespace(interrupt_speculative=lambda: order.append("stop") or True)
    a._pass_on([SpeechEvent("audio", 0, audio=np.zeros(512, np.float32)), SpeechEvent("pause", 512, speech_end=32)],
               0, None)
    assert order == [("heard", ["audio", "pause"])]
    a._pass_on([SpeechEvent("resume", 1024), SpeechEvent("audio", 1024, audio=np.zeros(512, np.float32))], 0, None)
    assert order[1:] == [("heard", ["resume", "audio"]), "stop"]
