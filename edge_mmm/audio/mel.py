"""Whisper's log-mel spectrogram, computed exactly as openai-whisper does (filters built, not shipped)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

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


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """Log-mel [n_mels, frames] of a 16 kHz mono waveform, with `padding` zero samples appended first."""
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio,
                            dtype=torch.float32)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filters(n_mels)).to(audio.device)
    mel_spec = filters @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim(mel: torch.Tensor, length: int) -> torch.Tensor:
    """Pad with zeros or trim the last axis of `mel` to `length` frames."""
    n = mel.shape[-1]
    if n > length:
        return mel[..., :length]
    if n < length:
        return F.pad(mel, (0, length - n))
    return mel
