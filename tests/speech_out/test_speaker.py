"""The speaker with real espeak-ng into a RecordingSink (real-time paced): sentence-by-sentence streaming,
first-audio times taken from the played blocks, and stop() silencing the sink within 150 ms."""

import shutil
import time

import numpy as np
import pytest

from edge_mmm.speech_out.echo import EchoGate, EchoGateConfig
from edge_mmm.speech_out.playback import PlaybackBuffer, RecordingSink
from edge_mmm.speech_out.speaker import Speaker
from edge_mmm.speech_out.tts import EspeakTts

STOP_BOUND_S = 0.150  # the barge-in bound: stop() -> last sample written to the sink


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def speaker():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    sink = RecordingSink()
    sp = Speaker(EspeakTts(), sink)
    firsts = []
    sp.on_first_audio = lambda tag, t: firsts.append((tag, t))
    sp.firsts = firsts
    sp.start()
    yield sp
    assert sp.close(timeout=2.0)


def test_first_sentence_plays_before_the_answer_is_complete(speaker):
    t_said = time.monotonic()
    speaker.say("The sky is blue. And the", tag=7)
    assert _wait(lambda: speaker.firsts), "no audio reached the sink"
    assert speaker.sink.audio().size > 0  # the answer is still open: only its first sentence is spoken
    tag, t_first = speaker.firsts[0]
    assert tag == 7 and t_said < t_first <= speaker.sink.blocks[0][0] + 1e-3
    speaker.say(" grass is green.", tag=7)
    speaker.end(tag=7)
    assert speaker.wait_done(20.0) and not speaker.is_playing()
    assert [s for _, s in speaker.spoken] == ["The sky is blue.", "And the grass is green."]
    assert len(speaker.firsts) == 1  # one first-audio time per tag


def test_stop_silences_the_sink_within_150_ms(speaker):
    speaker.say("This is a long answer that keeps talking for several seconds, so that the user can "
                "interrupt it in the middle of a sentence.", tag=1)
    speaker.end(tag=1)
    assert _wait(lambda: speaker.sink.audio().size > 0.3 * speaker.tts.sample_rate)
    t_stop = speaker.stop()
    time.sleep(0.4)
    last = speaker.sink.last_write_t()
    print(f"stop() -> last sample written: {1000 * (last - t_stop):.1f} ms")
    assert last - t_stop <= STOP_BOUND_S
    assert not speaker.is_playing()
    n = speaker.sink.audio().size
    assert n < 4 * speaker.tts.sample_rate  # far less than the whole answer was played
    speaker.say("Next answer.", tag=2)  # the speaker goes on after a stop
    speaker.end(tag=2)
    assert speaker.wait_done(20.0) and speaker.sink.audio().size > n and speaker.firsts[-1][0] == 2


def test_echo_gate_silences_echo_level_audio_and_passes_louder_speech():
    rate = 22050
    buf = PlaybackBuffer(rate)
    gate = EchoGate(buf, EchoGateConfig(tail_s=0.3, window_s=0.5, echo_gain=1.0, barge_in_db=6.0))
    rng = np.random.default_rng(0)
    played = (0.1 * rng.standard_normal(rate)).astype(np.float32)  # RMS 0.1
    buf.push(played, tag=1)
    t0 = time.monotonic()
    assert gate.active(t0)  # audio waiting to be played counts as playing
    for i in range(10):  # 0.2 s of playback
        buf.pull(441, t0 + i * 0.02)
    echo = (0.1 * rng.standard_normal(2048)).astype(np.float32)
    assert not gate(echo, t0 + 0.2).any()  # the echo of the played level: silenced
    user = 4 * echo  # +12 dB: above the 6 dB margin
    assert np.array_equal(gate(user, t0 + 0.2), user)
    assert gate.gated_frames == 4 and gate.passed_frames == 4
    buf.clear()
    assert gate.active(t0 + 0.2 + 0.29) and not gate.active(t0 + 0.2 + 0.31)  # the tail after the last sample
    assert np.array_equal(gate(echo, t0 + 0.6), echo)  # playback over: the mic is open again


class BeepTts:
    """Another engine through the same interface: a 100 ms beep and 50 ms of silence per word; "fail" raises."""

    sample_rate = 8000

    def synthesize(self, text):
        if "fail" in text:
            raise RuntimeError("cannot say that")
        beep = 0.3 * np.sin(2 * np.pi * 440 * np.arange(800) / 8000)
        return np.tile(np.concatenate([beep, np.zeros(400)]), len(text.split())).astype(np.float32)

    def cancel(self):
        pass


def test_any_engine_plugs_in_and_a_failing_sentence_is_reported_not_fatal():
    errors = []
    sp = Speaker(BeepTts(), RecordingSink(), on_error=errors.append)
    sp.start()
    try:
        sp.say("One two. Please fail now. Three four five.", tag="a")
        sp.end(tag="a")
        assert sp.wait_done(10.0)
    finally:
        assert sp.close(2.0)
    assert len(errors) == 1 and "Please fail now." in errors[0] and "cannot say that" in errors[0]
    audio = sp.sink.audio()
    assert audio.size == pytest.approx(5 * 1200, abs=2 * 160)  # 5 words; each clip padded to whole 20 ms blocks
    assert [s for _, s in sp.spoken] == ["One two.", "Three four five."]


def test_a_held_speaker_synthesizes_but_plays_nothing_until_released(speaker):
    speaker.hold()
    speaker.say("Held sentence.", tag=4)
    speaker.end(tag=4)
    time.sleep(1.0)  # espeak-ng takes ~50 ms for this: it is synthesized and waits
    assert speaker.held and speaker.is_playing() and speaker.sink.audio().size == 0 and not speaker.firsts
    t_release = time.monotonic()
    speaker.release()
    assert _wait(lambda: speaker.firsts) and speaker.firsts[0][0] == 4
    assert speaker.firsts[0][1] - t_release < 0.2  # it was ready: played as soon as released
    assert speaker.wait_done(20.0)
    # a stop() during a hold drops what waits; the hold stays until released
    speaker.hold()
    speaker.say("Never heard.", tag=5)
    speaker.end(tag=5)
    time.sleep(0.5)
    n = speaker.sink.audio().size
    speaker.stop()
    assert speaker.held and _wait(lambda: not speaker.is_playing(), 1.0)
    speaker.say("Heard next.", tag=6)
    speaker.end(tag=6)
    time.sleep(0.5)
    assert speaker.sink.audio().size == n
    speaker.release()
    assert speaker.wait_done(20.0) and [t for t, _ in speaker.firsts] == [4, 6] and speaker.sink.audio().size > n


def test_a_sink_asked_for_blocks_long_before_they_are_due_plays_silence_and_keeps_the_answer():
    """SoundDeviceSink.fill, as PortAudio's callback calls it: blocks every 20 ms play the answer in order;
    after an underrun, a burst of callbacks all reported to be heard at once (the ALSA `pulse` plugin asked
    for 7.9 s of audio within 0.5 s and played none of it) gets silence once it runs 0.3 s ahead, and the
    answer goes on from there when the stream plays again: at most 0.3 s of it went into the burst."""
    from edge_mmm.errors import InputError
    from edge_mmm.speech_out.playback import SoundDeviceSink

    rate, frames = 22050, 441
    answer = np.arange(1, 10 * rate + 1, dtype=np.float32) / (10 * rate)  # sample value = its position
    buf = PlaybackBuffer(rate)
    buf.push(answer, tag=1)
    sink = SoundDeviceSink(block_s=frames / rate)
    out = np.zeros((frames, 1), np.float32)
    played = []
    t = 0.0
    for _ in range(50):  # one second in real time, one block per 20 ms
        sink.fill(buf, out, frames, t)
        played.append(out[:, 0].copy())
        t += frames / rate
    for _ in range(400):  # the burst: 8 s of blocks asked for within no time
        sink.fill(buf, out, frames, t)
        played.append(out[:, 0].copy())
    taken = np.concatenate(played)
    audible = taken[taken > 0]
    assert np.array_equal(audible, answer[:audible.size])  # in order, nothing skipped
    assert 1.0 <= audible.size / rate <= 1.0 + 0.3 + frames / rate  # the burst got at most 0.3 s of it
    assert sink.run_ahead_blocks >= 400 - int(0.3 * rate / frames) - 1
    before = audible.size
    t += 0.5  # the stream plays again, in real time
    sink.fill(buf, out, frames, t)
    assert np.array_equal(out[:, 0], answer[before:before + frames])  # the answer goes on where it stopped
    pairs = SoundDeviceSink(block_s=frames / rate)
    buf2 = PlaybackBuffer(rate)
    buf2.push(answer, tag=1)
    for k in range(100):  # two blocks per 40 ms callback pair (normal for a device): never run-ahead
        pairs.fill(buf2, out, frames, (k // 2) * 2 * frames / rate)
    assert pairs.run_ahead_blocks == 0
    with pytest.raises(InputError, match="max_run_ahead_s"):
        SoundDeviceSink(max_run_ahead_s=0)
