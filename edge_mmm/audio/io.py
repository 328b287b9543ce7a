"""Decode any audio file to 16 kHz mono float32 with PyAV (FFmpeg's libraries, no ffmpeg binary needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from edge_mmm.audio.constants import MIN_AUDIO_SECONDS, SAMPLE_RATE
from edge_mmm.audio.media_guard import AUDIO_FORMATS, MAX_AUDIO_SECONDS, MediaLimitError, open_media
from edge_mmm.errors import InputError

AudioInput = Union[str, Path, np.ndarray]


def load_audio(path: Union[str, Path], sample_rate: int = SAMPLE_RATE,
               max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode `path` to a mono float32 array at `sample_rate` in [-1, 1]; InputError if unreadable.

    Only single-file containers are read, from the file's own bytes (`media_guard`); decoding stops with a
    `MediaLimitError` once the audio passes `max_seconds`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"audio file not found: {path}")
    if path.is_dir():
        raise InputError(f"audio path is a directory, not a file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"audio file is empty (0 bytes): {path}")
    try:
        with open(path, "rb") as f:
            return decode_audio(f, str(path), sample_rate, max_seconds)
    except OSError as exc:
        raise InputError(f"cannot read audio file {path}: {exc.strerror or exc}") from exc


def decode_audio(source: Union[bytes, BinaryIO], name: str = "audio", sample_rate: int = SAMPLE_RATE,
                 max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode audio bytes (or a binary file object) to mono float32 at `sample_rate`, as `load_audio`.

    `name` is what errors call the input (an upload is never named by a server path)."""
    import av

    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError(f"{name}: empty (0 bytes)")
        source = io.BytesIO(bytes(source))
    max_samples = int(max_seconds * sample_rate)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks, total = [], 0

    def add(frames) -> None:
        nonlocal total
        for out in frames:
            x = out.to_ndarray().reshape(-1)
            total += x.size
            if total > max_samples:  # refuse before the memory is spent
                raise MediaLimitError(f"{name}: the audio is longer than the {max_seconds:g} s limit")
            chunks.append(x)

    try:
        with open_media(source, name, AUDIO_FORMATS) as container:
            if not container.streams.audio:
                raise InputError(f"no audio stream in {name}")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler stitch frames with gaps or odd timestamps
                add(resampler.resample(frame))
            add(resampler.resample(None))
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, MemoryError) as exc:
        raise InputError(f"cannot decode audio {name}: {exc.__class__.__name__}") from exc
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return check_audio(audio, name, sample_rate)


def check_audio(audio: np.ndarray, name: str = "audio", sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Validate a waveform: 1-D (or one row/column), finite, long enough to hold speech; float in [-1, 1], or
    int16/int32 PCM scaled to it (full scale -> 1.0)."""
    audio = np.asarray(audio)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise InputError(f"{name}: expected mono audio (1-D array), got shape {tuple(audio.shape)}")
    if audio.dtype in (np.int16, np.int32):  # integer PCM (a WAV's samples, sounddevice's int16 blocks)
        audio = audio.astype(np.float32) / float(2 ** (8 * audio.dtype.itemsize - 1))
    if not np.issubdtype(audio.dtype, np.floating):
        raise InputError(f"{name}: expected float samples in [-1, 1] or int16/int32 PCM, got dtype {audio.dtype}")
    seconds = audio.shape[0] / sample_rate
    if audio.shape[0] == 0:
        raise InputError(f"{name}: contains no audio samples")
    if seconds < MIN_AUDIO_SECONDS:
        raise InputError(f"{name}: audio is {seconds:.3f} s long, shorter than the {MIN_AUDIO_SECONDS} s "
                         f"minimum that can hold speech")
    if not np.isfinite(audio).all():
        raise InputError(f"{name}: audio contains NaN or infinite samples")
    return audio.astype(np.float32, copy=False)


def resolve_audio(audio: AudioInput, sample_rate: int = SAMPLE_RATE,
                  max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """A path is decoded (at most `max_seconds`); an array is taken as mono float32 already at `sample_rate`."""
    if isinstance(audio, (str, Path)):
        return load_audio(audio, sample_rate, max_seconds)
    return check_audio(audio, "audio array", sample_rate)


class StreamResampler:
    """Streaming resampler of mono float32 blocks at `rate` to 16 kHz float32 (FFmpeg's swresample through
    PyAV); it keeps its filter state across calls, so consecutive blocks join without clicks."""

    def __init__(self, rate: int):
        import av

        if rate <= 0:
            raise InputError(f"resampler input rate must be > 0, got {rate}")
        self.rate = rate
        self._r = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._av = av

    def __call__(self, x: np.ndarray) -> np.ndarray:
        frame = self._av.AudioFrame.from_ndarray(np.asarray(x, np.float32).reshape(1, -1), format="flt",
                                                 layout="mono")
        frame.sample_rate = self.rate
        out = [f.to_ndarray().reshape(-1) for f in self._r.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)
