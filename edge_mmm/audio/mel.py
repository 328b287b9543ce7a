"""Whisper's log-mel spectrogram, computed as openai-whisper does (filters built, not shipped): in numpy for
the CPU (`log_mel_spectrogram_np`: the onnxruntime path runs without torch) and in torch, openai's own ops,
for tensors on any device (`log_mel_spectrogram`: the reference of our Triton kernel)."""

from __future__ import annotations

import contextlib
import threading
from functools import lru_cache

import numpy as np

from edge_mmm.audio.constants import HOP_LENGTH, N_FFT, SAMPLE_RATE
from edge_mmm.errors import InputError


def _hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    # Slaney scale, as librosa.hz_to_mel(htk=False): linear below 1 kHz, logarithmic above.
    f_sp = 200.0 / 3
    mels = freqs / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = freqs >= min_log_hz
    mels[log_t] = min_log_mel + np.log(freqs[log_t] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


@lru_cache(maxsize=None)
def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-normalized mel filterbank [n_mels, n_fft//2+1], identical to librosa.filters.mel (float32)."""
    if n_mels not in (80, 128):
        raise InputError(f"n_mels must be 80 or 128 (Whisper's front ends), got {n_mels}")
    fftfreqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2, dtype=np.float64)
    min_mel, max_mel = _hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sample_rate / 2.0]))[0]
    mel_f = _mel_to_hz(np.linspace(min_mel, max_mel, n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    return (weights * enorm[:, None]).astype(np.float32)


def _finish(mel_spec, xp):
    """log10, clamp to 8 below the peak, scale: Whisper's normalization, for numpy or torch arrays."""
    log_spec = xp.log10(xp.maximum(mel_spec, 1e-10)) if xp is np else xp.clamp(mel_spec, min=1e-10).log10()
    log_spec = xp.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@lru_cache(maxsize=None)
def _hann(n: int) -> np.ndarray:
    """The periodic Hann window (torch.hann_window's default)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


_BLAS_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _blas_on_this_thread():
    """numpy's BLAS (OpenBLAS in numpy's wheels) on the calling thread only, inside the block. With its worker
    threads, OpenBLAS leaves them busy-waiting after the call (up to ~0.1 s), on the cores Whisper's encoder runs
    on next: a tiny.en window took 156 instead of 112 ms on 2 cores (docs/speech.md). The filter-bank product is
    ~1.7 ms on one thread. threadpoolctl sets the count for the process, so the limit is held under a lock (two
    callers cannot restore each other's value)."""
    with _BLAS_LOCK, _blas_controller().limit(limits=1, user_api="blas"):
        yield


def log_mel_spectrogram_np(audio, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Log-mel [n_mels, frames] float32 of a 16 kHz mono waveform, with `padding` zero samples appended
    first: torch.stft(center=True, reflect padding, periodic Hann) re-done with numpy's FFT."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise InputError(f"log-mel needs a mono waveform (1-D), got shape {audio.shape}")
    n_audio = len(audio)
    if padding > 0:
        audio = np.pad(audio, (0, padding))
    half = N_FFT // 2
    if len(audio) <= half:
        raise InputError(f"log-mel needs more than {half} samples (reflect padding), got {len(audio)}")
    x = np.pad(audio, (half, half), mode="reflect")
    n_frames = 1 + (len(x) - N_FFT) // HOP_LENGTH - 1  # the last frame is dropped, as openai's [..., :-1]
    # a frame that starts past the audio (in the zero padding; its reflection at the end is zeros too) has
    # exactly zero power: only the frames reaching the audio are transformed (a 30 s pad is most of the work)
    live = n_frames if padding <= half else min(n_frames, -(-(half + n_audio) // HOP_LENGTH))
    frames = np.lib.stride_tricks.as_strided(x, (live, N_FFT), (HOP_LENGTH * x.strides[0], x.strides[0]),
                                             writeable=False)
    spec = np.fft.rfft(frames * _hann(N_FFT), axis=-1)
    magnitudes = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    mel_spec = np.zeros((n_mels, n_frames), np.float32)
    with _blas_on_this_thread():
        mel_spec[:, :live] = mel_filters(n_mels) @ magnitudes.T
    return _finish(mel_spec, np).astype(np.float32)


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0):
    """Log-mel [n_mels, frames] torch tensor of a 16 kHz mono waveform (numpy or tensor, on its device), with
    `padding` zero samples appended first: openai-whisper's torch ops."""
    import torch
    import torch.nn.functional as F

    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio,
                            dtype=torch.float32)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filters(n_mels)).to(audio.device)
    return _finish(filters @ magnitudes, torch)


def pad_or_trim(mel, length: int):
    """Pad with zeros or trim the last axis of `mel` (numpy array or torch tensor) to `length` frames."""
    n = mel.shape[-1]
    if n > length:
        return mel[..., :length]
    if n < length:
        if isinstance(mel, np.ndarray):
            return np.pad(mel, [(0, 0)] * (mel.ndim - 1) + [(0, length - n)])
        import torch.nn.functional as F

        return F.pad(mel, (0, length - n))
    return mel
