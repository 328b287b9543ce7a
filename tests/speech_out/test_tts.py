import shutil
import threading
import time

import numpy as np
import pytest

from edge_mmm.errors import DeviceError, InputError
from edge_mmm.speech_out.tts import ESPEAK_RATE, EspeakConfig, EspeakTts, wav_samples

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _wav(pcm: np.ndarray, rate: int = 8000, bits: int = 16) -> bytes:
    fmt = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little") \
        + (rate * 2).to_bytes(4, "little") + (2).to_bytes(2, "little") + bits.to_bytes(2, "little")
    data = pcm.astype("<i2").tobytes()
    return (b"RIFF" + (0x7FFFFFFF).to_bytes(4, "little") + b"WAVE" + b"fmt " + (16).to_bytes(4, "little") + fmt
            + b"LIST" + (3).to_bytes(4, "little") + b"abc\x00" + b"data" + (0x7FFFFFFF).to_bytes(4, "little") + data)


def test_wav_samples_reads_a_streamed_wav_with_placeholder_sizes():
    pcm = np.array([0, 16384, -32768, 100], np.int16)
    x, rate = wav_samples(_wav(pcm))
    assert rate == 8000 and np.allclose(x, pcm / 32768.0)


@pytest.mark.parametrize("data", [b"", b"RIFF....AVIX", _wav(np.zeros(4, np.int16), bits=8), b"RIFF\0\0\0\0WAVE"])
def test_wav_samples_rejects_what_is_not_16bit_pcm_wav(data):
    with pytest.raises(InputError):
        wav_samples(data)


def test_bad_espeak_settings_are_input_errors():
    for kw in ({"speed": 10}, {"pitch": 120}, {"voice": "-w /tmp/x"}):
        with pytest.raises(InputError):
            EspeakConfig(**kw)


def test_missing_espeak_names_the_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DeviceError, match="apt-get install espeak-ng"):
        EspeakTts()


@needs_espeak
def test_espeak_speaks_a_sentence_and_text_is_never_an_option():
    tts = EspeakTts()
    x = tts.synthesize("Hello there, this is a test.")
    assert x.dtype == np.float32 and tts.sample_rate == ESPEAK_RATE
    assert 0.8 < x.size / ESPEAK_RATE < 4.0 and np.abs(x).max() > 0.1
    assert tts.synthesize("--version").size > 0.2 * ESPEAK_RATE  # spoken, not run as a flag
    assert tts.synthesize("   ").size == 0


@needs_espeak
def test_unknown_voice_is_an_input_error_at_construction():
    with pytest.raises(InputError, match="voice 'xx-nope'"):
        EspeakTts(EspeakConfig(voice="xx-nope"))


@needs_espeak
def test_cancel_ends_a_running_synthesis():
    tts = EspeakTts(EspeakConfig(speed=80))
    long_text = " ".join(["This sentence is long enough to take a while to synthesize."] * 40)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("x", tts.synthesize(long_text)))
    th.start()
    deadline = time.monotonic() + 10
    while tts._proc is None and time.monotonic() < deadline:  # cancel once espeak-ng runs
        time.sleep(0.001)
    tts.cancel()
    th.join(10)
    assert not th.is_alive() and result["x"].size == 0
