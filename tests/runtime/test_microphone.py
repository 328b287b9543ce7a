"""Audio in: the ring buffer (overflow is counted and reported, never silent), the audio-file source, the
sounddevice callback path with recorded frames, and a real PortAudio capture through a PulseAudio null sink."""

import subprocess
import time

import numpy as np
import pytest


from edge_mmm.audio.constants import SAMPLE_RATE  # noqa: E402
from edge_mmm.audio.io import StreamResampler  # noqa: E402
from edge_mmm.runtime.microphone import AudioFileSource, AudioRing, MicrophoneSource, parse_mic_source  # noqa: E402
from edge_mmm.errors import InputError  # noqa: E402


def test_ring_keeps_order_and_counts_overflow():
    ring = AudioRing(capacity_s=0.1)  # 1600 samples
    x = np.arange(1000, dtype=np.float32)
    ring.write(x[:600])
    out, pos, eos = ring.read(400, timeout=0)
    assert pos == 0 and np.array_equal(out, x[:400]) and not eos
    ring.write(x[600:])  # 600 unread, wraps around the end of the buffer
    out, pos, _ = ring.read(10_000, timeout=0)
    assert pos == 400 and np.array_equal(out, x[400:])
    assert ring.take_overflow() == 0
    ring.write(np.ones(2000, np.float32))  # the reader is 2000 samples behind a 1600-sample ring
    assert ring.overflow_samples == 400 and ring.take_overflow() == 400 and ring.take_overflow() == 0
    out, pos, _ = ring.read(10_000, timeout=0)
    assert pos == 1400 and out.size == 1600  # reading resumes after the lost samples, nothing else lost


def test_ring_end_of_stream_and_capture_times():
    ring = AudioRing(1.0)
    ring.write(np.zeros(160, np.float32), t=100.0)
    ring.write(np.zeros(160, np.float32), t=100.01)
    assert ring.capture_time(319) == pytest.approx(100.01)
    assert ring.capture_time(160) == pytest.approx(100.01 - 159 / SAMPLE_RATE)
    assert ring.capture_time(320) is None
    ring.mark_end()
    out, _, eos = ring.read(100, timeout=0)
    assert out.size == 100 and not eos
    out, _, eos = ring.read(1000, timeout=0)
    assert out.size == 220 and eos
    assert not ring.read(10, timeout=0)[2]  # reported once


def test_parse_mic_source(tmp_path):
    f = tmp_path / "a.wav"
    f.write_bytes(b"x")
    assert parse_mic_source(str(f)) == f
    assert parse_mic_source("3") == 3
    assert parse_mic_source("pulse") == "pulse"
    with pytest.raises(InputError, match="no such audio file"):
        parse_mic_source(str(tmp_path / "missing.wav"))


def test_audio_file_source_plays_whole_file_then_ends(question_clip):
    ring = AudioRing(30.0)
    src = AudioFileSource(question_clip, ring, speed=20.0)
    t0 = time.monotonic()
    src.start()
    assert src.finished.wait(10)
    elapsed = time.monotonic() - t0
    assert src.stop()
    assert ring.written == src.audio.size and ring.overflow_samples == 0
    out, _, eos = ring.read(ring.written, timeout=0)
    assert np.array_equal(out, src.audio) and eos
    assert elapsed >= 0.8 * src.duration_s / 20.0  # paced, not dumped at once


def _mic(ring, on_error=None):
    pytest.importorskip("sounddevice")
    try:
        return MicrophoneSource(None, ring, on_error or (lambda m, r: None))
    except OSError as exc:
        pytest.skip(f"PortAudio library missing: {exc}")


def test_callback_path_with_recorded_frames_reports_overflow(question_clip):
    """The PortAudio callback fed with recorded frames (as PortAudio delivers them: float32 (frames, 1))."""
    from edge_mmm.audio.io import load_audio

    audio = load_audio(question_clip)
    ring = AudioRing(capacity_s=1.0)
    mic = _mic(ring)
    import sounddevice as sd

    block, n_read, n_unread = 512, 16, 64  # 0.5 s read as it arrives, then 2 s nobody reads (1 s ring)
    for i in range(n_read):
        frames = audio[i * block:(i + 1) * block].reshape(-1, 1)
        mic.callback(frames, block, None, sd.CallbackFlags())
    got, _, _ = ring.read(SAMPLE_RATE, timeout=0)
    assert np.array_equal(got, audio[:n_read * block])
    flagged = sd.CallbackFlags()
    flagged.input_overflow = True  # PortAudio says the driver lost audio before this block
    for i in range(n_unread):
        frames = audio[(n_read + i) * block:(n_read + i + 1) * block].reshape(-1, 1)
        mic.callback(frames, block, None, flagged if i == 0 else sd.CallbackFlags())
    assert mic.driver_overflows == 1 and mic.callbacks == n_read + n_unread
    assert ring.overflow_samples == n_unread * block - SAMPLE_RATE
    assert ring.take_overflow() == ring.overflow_samples
    got, pos, _ = ring.read(SAMPLE_RATE, timeout=0)
    start = (n_read + n_unread) * block - SAMPLE_RATE
    assert pos == start and np.array_equal(got, audio[start:start + SAMPLE_RATE])  # the newest second survives


def test_callback_resamples_device_rate_to_16k():
    ring = AudioRing(5.0)
    mic = _mic(ring)
    mic._resample = StreamResampler(44100)
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for i in range(0, tone.size, 1024):
        mic.callback(tone[i:i + 1024].reshape(-1, 1), 1024, None, None)
    out, _, _ = ring.read(10 * SAMPLE_RATE, timeout=0)
    assert abs(out.size - SAMPLE_RATE) < 200  # ~1 s at 16 kHz (the resampler holds back a few samples)
    spectrum = np.abs(np.fft.rfft(out[1000:1000 + 8000]))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / 8000 - 440) <= 2


def test_real_portaudio_capture_through_pulseaudio(pulse_null_sink, question_clip, asr_model):
    """paplay the clip into a null sink; MicrophoneSource records its monitor through PortAudio (ALSA ->
    pulse plugin) at 16 kHz; real Whisper tiny.en transcribes what was captured."""
    import sounddevice as sd

    from conftest import QUESTION
    from wer import normalized_wer

    names = [d["name"] for d in sd.query_devices() if d["max_input_channels"] > 0]
    assert "pulse" in names, f"PortAudio does not see the ALSA pulse device: {names}"
    ring = AudioRing(30.0)
    errors = []
    mic = MicrophoneSource("pulse", ring, lambda m, r: errors.append(m))
    mic.start()
    try:
        deadline = time.monotonic() + 10
        while mic.callbacks < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mic.callbacks >= 3, f"no audio callbacks from PortAudio; errors: {errors}"
        subprocess.run(["paplay", f"--device={pulse_null_sink}", str(question_clip)], check=True, timeout=30)
        time.sleep(0.5)
    finally:
        assert mic.stop(timeout=2.0)
    audio, _, _ = ring.read(ring.written, timeout=0)
    assert mic.opened == 1 and not errors
    assert np.abs(audio).max() > 0.05, "captured only silence"
    text = asr_model.transcribe(audio).text
    assert normalized_wer(QUESTION, text) <= 0.2, text


def test_a_microphone_name_that_matches_nothing_fails_at_start(pulse_null_sink, capsys):
    """With PortAudio listing inputs, `--mic` naming none of them is a one-line error at start (it was retried
    every 8 s forever); a name that matches ('pulse') starts."""
    from edge_mmm.cli import main
    from edge_mmm.errors import InputError
    from edge_mmm.runtime.inputs import check_microphone

    check_microphone("pulse")  # a real input on this PulseAudio server
    with pytest.raises(InputError, match="no-such-mic-xyz.*input devices: .*pulse"):
        check_microphone("no-such-mic-xyz")
    with pytest.raises(InputError, match="input devices"):
        check_microphone(97)
    assert main(["run", "--camera", "none", "--mic", "no-such-mic-xyz", "--once"]) == 2
    err = capsys.readouterr().err
    assert "no-such-mic-xyz" in err and len(err.strip().splitlines()) == 1
