"""Spoken answers in the live runtime, with real espeak-ng, real Whisper tiny.en and the real SmolLM2 GGUF:
the answer is spoken sentence by sentence into a RecordingSink and timed (first audio out); speech over the
playback barges in and stops audio and answer (stop -> last sample written <= 150 ms, measured); and on a
PulseAudio loopback (the null sink the answer is played into is what the microphone records) the assistant
does not take its own voice for a new question."""

import queue
import shutil
import subprocess
import time
import wave

import numpy as np
import pytest

from edge_mmm.runtime.assistant import LiveAssistant, LiveConfig, LiveModels
from edge_mmm.speech_out.echo import EchoGateConfig
from edge_mmm.speech_out.playback import RecordingSink, SoundDeviceSink
from edge_mmm.speech_out.speaker import Speaker, SpeakerConfig
from edge_mmm.speech_out.tts import EspeakTts
from conftest import QUESTION  # noqa: E402

STOP_BOUND_S = 0.150
LONG_QUESTION = "Tell me a long story about a dragon who learns to cook soup."
BLOCK = 512


@pytest.fixture(scope="module")
def text_models(asr_model, smollm2):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    from edge_mmm.text.api import load_lm

    return LiveModels(asr_model, load_lm(backend="onnxruntime"))


def _collect(q, until, timeout=90.0, must=True):
    """Events until `until(events)` holds (an AssertionError after `timeout` s, unless not `must`)."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out.append(q.get(timeout=0.05))
        except queue.Empty:
            continue
        if until(out):
            return out
    if not must:
        return out
    raise AssertionError(f"timed out; got {[(e.type, e.data.get('stage')) for e in out]}")


def _drain(q, seconds):
    """Every event published within the next `seconds`."""
    return _collect(q, lambda evs: False, seconds, must=False)


def _stage(evs, stage):
    return [e.data for e in evs if e.type == "timing" and e.data.get("stage") == stage]


def _feed_realtime(a, audio):
    t0 = time.monotonic()
    for j in range(0, audio.size, BLOCK):
        time.sleep(max(0.0, t0 + (j + BLOCK) / 16000 - time.monotonic()))
        a.feed_audio(audio[j:j + BLOCK])


def test_spoken_question_is_answered_aloud_and_first_audio_is_timed(text_models, question_clip):
    from edge_mmm.audio.io import load_audio

    sink = RecordingSink()
    speaker = Speaker(EspeakTts(), sink)
    a = LiveAssistant(LiveConfig(max_tokens=40), text_models, speaker=speaker)
    q = a.subscribe(maxsize=10_000)
    a.start()
    try:
        _feed_realtime(a, load_audio(question_clip))
        evs = _collect(q, lambda evs: _stage(evs, "speech_out") and _stage(evs, "turn"))
        assert speaker.wait_done(60.0)
    finally:
        assert a.stop(timeout=3.0)
    turn, out = _stage(evs, "turn")[0], _stage(evs, "speech_out")[0]
    answer = next(e.data["text"] for e in evs if e.type == "answer.done")
    assert out["turn"] == turn["turn"] and out["source"] == "speech"
    assert out["eos_to_first_audio_s"] >= turn["eos_to_first_token_s"] > 0
    assert out["eos_to_first_audio_s"] == pytest.approx(turn["eos_to_first_token_s"] + out["first_token_to_audio_s"],
                                                        abs=2e-6)
    assert out["ttfa_s"] >= turn["ttft_s"]
    spoken = " ".join(s for _, s in speaker.spoken)
    assert spoken.split() == answer.split()  # every word of the answer was spoken, in order
    assert sink.audio().size > 0.5 * speaker.tts.sample_rate
    assert not [e for e in evs if e.type == "error"]


def test_speech_over_the_playback_stops_audio_and_answer_within_150_ms(text_models, question_clip):
    """A typed question with a long answer; once it is heard, the user talks over it (the sink is not
    heard by the mic here, so the gate is told the echo would be 20 dB down, as from a speaker in a room)."""
    from edge_mmm.audio.io import load_audio

    sink = RecordingSink()
    speaker = Speaker(EspeakTts(), sink, SpeakerConfig(echo=EchoGateConfig(echo_gain=0.1)))
    a = LiveAssistant(LiveConfig(max_tokens=200), text_models, speaker=speaker)
    q = a.subscribe(maxsize=10_000)
    a.start()
    try:
        a.ask_text(LONG_QUESTION)
        evs = _collect(q, lambda evs: sink.audio().size > 0 or any(e.type == "answer.done" for e in evs))
        assert not any(e.type == "answer.done" for e in evs), "the answer ended before it was heard"
        rate = speaker.tts.sample_rate
        deadline = time.monotonic() + 30
        while speaker.buffer.pending() < 2 * rate and time.monotonic() < deadline:
            time.sleep(0.01)  # seconds of answer waiting to be played: the barge-in lands mid-sentence
        assert speaker.buffer.pending() >= 2 * rate
        t_talk = time.monotonic()
        _feed_realtime(a, load_audio(question_clip)[int(0.9 * 16000):])  # 0.1 s of silence, then speech
        evs += _collect(q, lambda evs: any(e.type == "answer.done" for e in evs))
        time.sleep(0.5)
        played = sink.audio().size
        t_stop, dropped = next(s for s in speaker.stops if s[0] > t_talk)  # the barge-in's stop
        # the old answer's last audible block: the pipeline may already be speaking the next answer, which
        # cannot start within 1 s of the stop (the user's question is still being spoken then)
        t_last = max(t for t, _ in list(sink.blocks) if t <= t_stop + 1.0)
        evs += _collect(q, lambda evs: len(_stage(evs, "turn")) >= 2)  # the spoken question is answered next
    finally:
        assert a.stop(timeout=3.0)
    done = [e.data for e in evs if e.type == "answer.done"]
    assert done[0]["cancelled"] and done[0]["question"] == LONG_QUESTION
    assert any(e.type == "notice" and "stopped the spoken answer" in e.data["message"] for e in evs)
    rate = speaker.tts.sample_rate
    print(f"barge-in: speech fed -> stop() {t_stop - t_talk:.3f} s (0.1 s silence + VAD); stop() -> last sample "
          f"written {1000 * (t_last - t_stop):.1f} ms; {played / rate:.2f} s played, {dropped / rate:.2f} s dropped")
    assert dropped > 0  # the stop came while audio was still waiting to be played
    assert t_last - t_stop <= STOP_BOUND_S
    finals = [e.data["text"] for e in evs if e.type == "transcript.final" and e.data["source"] == "speech"]
    assert len(finals) == 1 and "car" in finals[0].lower()  # the user's words, not the answer's


def test_loopback_the_assistant_does_not_answer_its_own_voice(pulse_null_sink, text_models):
    """The answer plays into a PulseAudio null sink through PortAudio; the 'pulse' microphone records that
    sink's monitor, so the mic hears every word the assistant says (at the level it is played)."""
    sink = SoundDeviceSink("pulse")
    speaker = Speaker(EspeakTts(), sink)
    a = LiveAssistant(LiveConfig(mic="pulse", max_tokens=60), text_models, speaker=speaker)
    q = a.subscribe(maxsize=10_000)
    a.start()
    try:
        time.sleep(1.0)  # the input stream is open
        a.ask_text("What do you know about the planet Mars?")
        evs = _collect(q, lambda evs: _stage(evs, "speech_out"))
        assert speaker.wait_done(60.0)
        time.sleep(1.5)  # a tail of echo, if the gate let it through, would be transcribed by now
        assert a.wait_idle(30.0)
        while True:
            try:
                evs.append(q.get_nowait())
            except queue.Empty:
                break
    finally:
        assert a.stop(timeout=3.0)
    gate = speaker.echo_gate
    print(f"loopback: {gate.gated_frames} mic frames gated (loudest RMS {gate.loudest_gated:.3f}), "
          f"{gate.passed_frames} passed; first audio {_stage(evs, 'speech_out')[0]}")
    assert gate.loudest_gated > 0.02, "the microphone did not hear the playback: the loopback is not wired"
    own = [e.data for e in evs if e.type == "transcript.final" and e.data.get("source") == "speech"]
    assert own == [], f"the assistant transcribed its own voice: {own}"
    assert not [e for e in evs if e.type == "notice" and "barge-in" in e.data["message"]]
    assert len(_stage(evs, "turn")) == 1


@pytest.mark.parametrize("extra", [[], ["--echo-cancel"]], ids=["gate", "echo-cancel"])
def test_cli_run_speak_plays_the_answer_and_times_first_audio(capsys, pulse_null_sink, question_clip, smollm2, extra):
    """`edge-mmm run --speak --speaker pulse [--echo-cancel]`: the answer is played into the null sink through
    PortAudio and the run ends after the last sample was played (--once waits for the speech)."""
    import json

    from edge_mmm.cli import main

    if extra:
        pytest.importorskip("livekit.rtc")
    rc = main(["run", "--camera", "none", "--mic", str(question_clip), "--once", "--json", "--max-tokens", "24",
               "--speak", "--speaker", "pulse"] + extra)
    out = capsys.readouterr()
    assert rc == 0, out.err
    events = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    timing = [e["data"] for e in events if e["type"] == "timing"]
    turn = next(d for d in timing if d["stage"] == "turn")
    spoken = next(d for d in timing if d["stage"] == "speech_out")
    assert spoken["turn"] == turn["turn"] and spoken["eos_to_first_audio_s"] > turn["eos_to_first_token_s"]
    assert not [e for e in events if e["type"] == "error"]


def test_cli_run_speak_with_an_unknown_voice_exits_2_with_one_line(capsys):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    from edge_mmm.cli import main

    rc = main(["run", "--camera", "none", "--mic", "default", "--speak", "--voice", "xx-nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "voice 'xx-nope' does not exist" in err[0]


def test_stop_silences_portaudio_playback_on_the_loopback(pulse_null_sink):
    """stop() during PortAudio playback: the last audible block leaves the output callback within 150 ms;
    the microphone on the null sink's monitor hears silence soon after (printed: that adds PulseAudio's
    output and input latency)."""
    from edge_mmm.runtime.microphone import AudioRing, MicrophoneSource

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    ring = AudioRing(30.0)
    mic = MicrophoneSource("pulse", ring, lambda m, r: None)
    speaker = Speaker(EspeakTts(), SoundDeviceSink("pulse"))
    mic.start()
    speaker.start()
    try:
        speaker.say("This answer is long enough to be cut off in the middle, when the user starts talking "
                    "over it, which is what this test does.", tag=1)
        speaker.end(tag=1)
        deadline = time.monotonic() + 20
        while speaker.buffer.pending() == 0 or speaker.buffer.last_write_t is None:
            assert time.monotonic() < deadline, "nothing was played"
            time.sleep(0.01)
        time.sleep(1.0)  # a second of it is heard
        t_stop = speaker.stop()
        time.sleep(1.0)
        t_last_out = speaker.buffer.last_write_t
    finally:
        assert speaker.close(2.0)
        assert mic.stop(timeout=2.0)
    audio, start, _ = ring.read(ring.written, timeout=0)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    assert loud.size, "the microphone did not hear the playback"
    t_last_heard = ring.capture_time(start + int(loud[-1]))
    print(f"PortAudio stop: stop() -> last audible block out of the callback {1000 * (t_last_out - t_stop):.1f} ms; "
          f"-> last sample heard on the monitor {1000 * (t_last_heard - t_stop):.0f} ms")
    assert t_last_out - t_stop <= STOP_BOUND_S
    dropped = next(d for t, d in speaker.stops if t == t_stop)
    assert dropped > 2 * speaker.tts.sample_rate  # seconds of the answer were dropped, not played


def test_loopback_echo_cancel_lets_the_user_talk_over_the_answer_at_a_lower_level(pulse_null_sink, text_models,
                                                                                  tmp_path):
    """`--echo-cancel` on the PulseAudio loopback: the answer plays into the null sink, and while it plays the
    user's question is played into the same sink 10 dB quieter (what the gate alone silences: it needs the
    user 6 dB above the echo). AEC3 removes the answer from the microphone, so the quieter question barges in:
    the spoken answer stops and the question is what gets transcribed; the answer alone (two seconds of it
    before the user talks) never barges in. The contrast with the gate alone: tests/speech_out/test_aec.py."""
    pytest.importorskip("livekit.rtc")
    from edge_mmm.audio.synth import synthesize
    from edge_mmm.speech_out.aec import EchoCancelConfig

    # the user is not the assistant: another espeak-ng voice than the answer's, scaled to 10 dB under the
    # answer's level (written as a WAV for paplay, whose --volume is cubic, not linear)
    from edge_mmm.audio.io import load_audio

    user = load_audio(synthesize(QUESTION, tmp_path / "user.wav", voice="en-us+m3", lead_silence=0.3))
    answer_rms = float(np.sqrt(np.mean(EspeakTts().synthesize(LONG_QUESTION) ** 2)))
    user *= 10 ** (-10 / 20) * answer_rms / float(np.sqrt(np.mean(user[user != 0] ** 2)))
    question_clip = tmp_path / "user_quiet.wav"
    with wave.open(str(question_clip), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(user, -1, 1) * 32767).astype("<i2").tobytes())

    sink = SoundDeviceSink("pulse")
    speaker = Speaker(EspeakTts(), sink, SpeakerConfig(echo_cancel=EchoCancelConfig()))
    a = LiveAssistant(LiveConfig(mic="pulse", max_tokens=200), text_models, speaker=speaker)
    q = a.subscribe(maxsize=10_000)
    a.start()
    try:
        time.sleep(1.0)  # the input stream is open
        a.ask_text(LONG_QUESTION)
        rate = speaker.tts.sample_rate
        deadline = time.monotonic() + 60
        while (speaker.buffer.last_write_t is None or speaker.buffer.pending() < rate) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert speaker.buffer.last_write_t is not None, "nothing was played"
        time.sleep(2.0)  # AEC3 hears two seconds of the answer alone: nothing of it may pass
        evs = []
        while True:
            try:
                evs.append(q.get_nowait())
            except queue.Empty:
                break
        aec = speaker.echo_gate
        assert not [e for e in evs if e.type == "notice" and "barge-in" in e.data["message"]], (
            f"the answer alone barged in: AEC took {aec.suppression_db():.1f} dB off; the gate silenced "
            f"{aec.gate.gated_frames} frames ({aec.gate.echo_frames} as leaks), passed {aec.gate.passed_frames}")
        subprocess.run(["paplay", f"--device={pulse_null_sink}", str(question_clip)], check=True, timeout=30)
        evs += _collect(q, lambda evs: any(e.type == "transcript.final" and e.data.get("source") == "speech"
                                           for e in evs))
        # a pause after words that read as a finished sentence ends the question early; what follows within
        # end_silence_ms continues it (a second final, both parts joined): wait until that can no longer come
        evs += _drain(q, a.config.end_silence_ms / 1000 + 2.0)
    finally:
        assert a.stop(timeout=3.0)
    aec = speaker.echo_gate
    print(f"loopback + AEC: {aec.frames} frames, AEC took {aec.suppression_db():.1f} dB off while the answer played; "
          f"gate after it: {aec.gate.gated_frames} gated ({aec.gate.echo_frames} as leaks), "
          f"{aec.gate.passed_frames} passed")
    # the quieter voice barged in: the spoken answer was stopped (its text may have been complete by then)
    assert any(e.type == "notice" and "stopped the spoken answer" in e.data["message"] for e in evs)
    assert any(dropped > rate for _, dropped in speaker.stops)  # seconds of the answer were dropped unplayed
    # the user's words, not the answer's: AEC3 damps the user while both talk (on this loopback the VAD hears
    # them ~0.5-1 s in), so the start of the question may be lost; what follows the stop is clean
    finals = [e.data for e in evs if e.type == "transcript.final" and e.data["source"] == "speech"]
    asked = [f["text"] for f in finals if not any(g.get("continues") == f["utterance"] for g in finals)]
    print(f"transcribed: {[f['text'] for f in finals]}")
    assert len(asked) == 1 and "building" in asked[0].lower() and "dragon" not in asked[0].lower(), finals


def test_cli_run_echo_cancel_needs_speak_and_builds_the_canceller(capsys, monkeypatch):
    from edge_mmm import cli
    from edge_mmm.cli import main

    rc = main(["run", "--camera", "none", "--mic", "default", "--echo-cancel"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--echo-cancel" in err[0] and "--speak" in err[0]
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    pytest.importorskip("sounddevice")
    pytest.importorskip("livekit.rtc")
    from edge_mmm.speech_out.aec import EchoCanceller
    from edge_mmm.speech_out.echo import EchoGate

    assert isinstance(cli._speaker(None, "en-us", echo_cancel=True).echo_gate, EchoCanceller)
    assert type(cli._speaker(None, "en-us").echo_gate) is EchoGate
    import sys

    monkeypatch.setitem(sys.modules, "livekit.rtc", None)  # livekit not installed
    rc = main(["run", "--camera", "none", "--mic", "default", "--speak", "--echo-cancel"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "edge-mmm[aec]" in err[0], err


def test_an_early_answer_is_not_spoken_while_the_question_may_go_on(text_models, tmp_path):
    """--speak with the early endpoint: "What is the capital of France?" is answered (text) 0.3 s into the
    pause, but its audio is held while the question may still go on (a 1 s end-silence wait here); the speaker
    goes on 0.7 s into the pause, so that answer is dropped unheard and only the whole question's is spoken."""
    from edge_mmm.audio.io import load_audio
    from media_samples import continued_question

    sink = RecordingSink()
    speaker = Speaker(EspeakTts(), sink)
    a = LiveAssistant(LiveConfig(max_tokens=40, end_silence_ms=1000), text_models, speaker=speaker)
    q = a.subscribe(maxsize=10_000)
    a.start()
    try:
        _feed_realtime(a, load_audio(continued_question(tmp_path / "q.wav")))
        evs = _collect(q, lambda evs: len(_stage(evs, "turn")) >= 2 and _stage(evs, "speech_out"))
        assert speaker.wait_done(60.0)
    finally:
        assert a.stop(timeout=3.0)
    finals = [e.data for e in evs if e.type == "transcript.final"]
    turns, out = _stage(evs, "turn"), _stage(evs, "speech_out")
    assert len(finals) == 2 and finals[1]["continues"] == finals[0]["utterance"]
    assert turns[0]["endpoint_s"] < 0.5 and turns[1]["withdrew"]  # the first part was answered early (text)
    assert [o["turn"] for o in out] == [turns[1]["turn"]]  # but only the whole question's answer was heard
    assert {tag for tag, _ in speaker.spoken} == {turns[1]["turn"]}
    # played once the question could no longer go on: after the 1 s window, not 0.3 s
    assert out[0]["eos_to_first_audio_s"] >= 0.95
