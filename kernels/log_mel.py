"""Whisper's log-mel front end with the filterbank, log and normalization fused after the STFT.

    power[f, t] = |STFT(audio)[f, t]|^2        (n_fft 400, hop 160, Hann; last frame dropped)
    mel[m, t]   = sum_f filters[m, f] * power[f, t]
    log[m, t]   = log10(max(mel[m, t], 1e-10))
    out[m, t]   = (max(log[m, t], max(log) - 8) + 4) / 4

The STFT stays in torch (cuFFT is the best FFT there is); kernel 1 reads its complex output directly,
squares it, multiplies by the filterbank on the tensor cores (float32, "ieee"), takes the log and a
per-tile max; kernel 2 reduces those maxima and applies the floor and scale in place. No host sync.
The reference is edge_mmm.audio.mel.log_mel_spectrogram (openai-whisper's math), reused, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_mmm.errors import InputError
from edge_mmm.kernels.dispatch import cdiv, check_tensor, jit, next_power_of_2, use_triton

tl = None  # triton.language, bound by dispatch.jit on first launch


@jit
def _log_mel_kernel(SPEC, FILT, OUT, PART_MAX, N_MELS, N_FREQ, T, s_sf, s_st, s_fm,
                    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_ok = offs_m < N_MELS
    t_ok = offs_t < T
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for f0 in range(0, N_FREQ, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < N_FREQ
        filt = tl.load(FILT + offs_m[:, None] * s_fm + offs_f[None, :], mask=m_ok[:, None] & f_ok[None, :], other=0.0)
        spec = SPEC + offs_f[:, None].to(tl.int64) * s_sf + offs_t[None, :].to(tl.int64) * s_st
        mask = f_ok[:, None] & t_ok[None, :]
        re = tl.load(spec, mask=mask, other=0.0)  # view_as_real: real part, then imaginary at +1
        im = tl.load(spec + 1, mask=mask, other=0.0)
        acc += tl.dot(filt, re * re + im * im, input_precision="ieee")
    log = tl.log2(tl.maximum(acc, 1e-10)) * 0.30102999566398120  # log10(x) = log2(x) * log10(2)
    ok = m_ok[:, None] & t_ok[None, :]
    tl.store(OUT + offs_m[:, None].to(tl.int64) * T + offs_t[None, :], log, mask=ok)
    tile_max = tl.max(tl.max(tl.where(ok, log, float("-inf")), axis=1), axis=0)
    tl.store(PART_MAX + pid_m * tl.num_programs(1) + pid_t, tile_max)


@jit
def _log_mel_finalize_kernel(OUT, PART_MAX, n, n_parts, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    p = tl.arange(0, BLOCK_P)
    floor = tl.max(tl.load(PART_MAX + p, mask=p < n_parts, other=float("-inf")), axis=0) - 8.0
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(OUT + offs, mask=ok, other=0.0)
    tl.store(OUT + offs, (tl.maximum(x, floor) + 4.0) / 4.0, mask=ok)


def log_mel_reference(audio: torch.Tensor, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram, as edge_mmm.audio.mel computes it."""
    from edge_mmm.audio.mel import log_mel_spectrogram

    return log_mel_spectrogram(audio, n_mels=n_mels, padding=padding)


def log_mel(audio: torch.Tensor, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """Log-mel `[n_mels, frames]` of a 16 kHz mono float waveform `[N]` (Whisper's front end)."""
    from edge_mmm.audio.constants import HOP_LENGTH, N_FFT
    from edge_mmm.audio.mel import mel_filters

    op = "log_mel"
    check_tensor(op, "audio", audio, ndim=(1,), dtypes=(torch.float32, torch.float16, torch.bfloat16))
    if padding < 0:
        raise InputError(f"{op}: padding must be >= 0, got {padding}")
    if audio.shape[0] + padding <= N_FFT // 2:
        raise InputError(f"{op}: audio has {audio.shape[0] + padding} samples; need more than {N_FFT // 2}")
    filters_np = mel_filters(n_mels)  # raises InputError for an unsupported n_mels
    if not use_triton(audio):
        return log_mel_reference(audio, n_mels, padding)
    audio = audio.float()
    if padding:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.view_as_real(torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True))
    n_freq, frames = stft.shape[0], stft.shape[1] - 1  # Whisper drops the last frame
    filters = torch.from_numpy(filters_np).to(audio.device)
    out = torch.empty((n_mels, frames), dtype=torch.float32, device=audio.device)
    block_m, block_t, block_f = 32, 64, 32
    grid = (cdiv(n_mels, block_m), cdiv(frames, block_t))
    part_max = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=audio.device)
    _log_mel_kernel[grid](stft, filters, out, part_max, n_mels, n_freq, frames, stft.stride(0), stft.stride(1),
                          filters.stride(0), BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_F=block_f)
    n = out.numel()
    block = 1024
    _log_mel_finalize_kernel[(cdiv(n, block),)](out, part_max, n, part_max.numel(), BLOCK=block,
                                                BLOCK_P=next_power_of_2(part_max.numel()))
    return out
