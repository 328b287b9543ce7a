"""Decode any audio file to 16 kHz mono float32 with PyAV (FFmpeg's libraries, no ffmpeg binary needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from edge_mmm.audio.constants import MIN_AUDIO_SECONDS, SAMPLE_RATE
from edge_mmm.errors import InputError

AudioInput = Union[str, Path, np.ndarray]


def load_audio(path: Union[str, Path], sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode `path` to a mono float32 array at `sample_rate` in [-1, 1]; InputError if unreadable."""
    import av

    path = Path(path)
    if not path.exists():
        raise InputError(f"audio file not found: {path}")
    if path.is_dir():
        raise InputError(f"audio path is a directory, not a file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"audio file is empty (0 bytes): {path}")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks = []
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InputError(f"no audio stream in file: {path}")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler stitch frames with gaps or odd timestamps
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise InputError(f"cannot decode audio file {path}: {exc.__class__.__name__}: {exc}") from exc
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return check_audio(audio, str(path), sample_rate)


def check_audio(audio: np.ndarray, name: str = "audio", sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Validate a decoded waveform: 1-D, finite, and long enough to hold speech."""
    audio = np.asarray(audio)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise InputError(f"{name}: expected mono audio (1-D array), got shape {tuple(audio.shape)}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise InputError(f"{name}: expected float samples in [-1, 1], got dtype {audio.dtype}")
    seconds = audio.shape[0] / sample_rate
    if audio.shape[0] == 0:
        raise InputError(f"{name}: contains no audio samples")
    if seconds < MIN_AUDIO_SECONDS:
        raise InputError(f"{name}: audio is {seconds:.3f} s long, shorter than the {MIN_AUDIO_SECONDS} s "
                         f"minimum that can hold speech")
    if not np.isfinite(audio).all():
        raise InputError(f"{name}: audio contains NaN or infinite samples")
    return audio.astype(np.float32, copy=False)


def resolve_audio(audio: AudioInput, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A path is decoded; an array is taken as mono float32 already at `sample_rate`."""
    if isinstance(audio, (str, Path)):
        return load_audio(audio, sample_rate)
    return check_audio(audio, "audio array", sample_rate)
