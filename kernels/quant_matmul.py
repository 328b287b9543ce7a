"""Weight-only quantized matmul with fused dequantization: `y = x @ W.T`, W packed as in docs/quantization.md.

    INT4: W[n, k] = q * s[n, g] + z[n, g]   (zeros given)   or   (q - 8) * s[n, g]   (zeros None)
    INT8: W[n, k] = q * s[n, g]                                 with g = k // group_size

One kernel serves both widths and both shapes of work:
- GEMV (M <= 4, decode): a `[BLOCK_N, BLOCK_K]` weight tile is dequantized in registers and reduced
  against the M activation rows with `tl.sum`; K is split across programs (split-K) so a single
  token still fills every SM, and the partial sums are added in a fixed order (deterministic).
- GEMM (prefill): the dequantized tile feeds `tl.dot` (tensor cores for fp16/bf16 activations).
INT4 bytes hold elements 2i (low nibble) and 2i+1 (high nibble); the kernel never interleaves them:
it multiplies the low nibbles with the even activation columns and the high nibbles with the odd ones.

GGUF Q4_0 / Q4_1 / Q8_0 weights reach these kernels through a one-time lossless repack into this
layout (`edge_mmm.quant.gguf_blocks.from_gguf`), done when the file is loaded; no separate GGUF kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels.dispatch import (FLOAT_DTYPES, cdiv, check_contiguous, check_same_device, check_tensor,
                                       fp32_dot, jit, next_power_of_2, use_triton)

tl = None  # triton.language, bound by dispatch.jit on first launch

GEMV_MAX_M = 4
SYMMETRIC_INT4_ZERO = 8  # the INT4 code that dequantizes to 0 in the scale-only form (GGUF Q4_0)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of one launch; `split_k` > 1 splits K across programs (GEMV)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


@jit
def _wxa16_matmul_kernel(X, QW, S, Z, OUT, M, N, K, K_PER_SPLIT,
                         stride_xm, stride_qn, stride_sn, stride_os, stride_om,
                         GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                         USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = offs_n.to(tl.int64)[:, None] * stride_qn
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if BITS == 4:
            kk = k0 + 2 * tl.arange(0, BLOCK_K // 2)  # the even columns; byte kk // 2 holds kk and kk + 1
            k_ok = kk < K
            w_mask = n_mask[:, None] & k_ok[None, :]
            packed = tl.load(QW + w_rows + (kk // 2)[None, :], mask=w_mask, other=0)
            if GROUP % BLOCK_K == 0:  # the whole tile lies in one group: one scale per row
                s = tl.load(S + s_rows + k0 // GROUP, mask=n_mask[:, None], other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    z = tl.load(Z + s_rows + k0 // GROUP, mask=n_mask[:, None], other=0.0).to(tl.float32)
            else:
                s = tl.load(S + s_rows + (kk // GROUP)[None, :], mask=w_mask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    z = tl.load(Z + s_rows + (kk // GROUP)[None, :], mask=w_mask, other=0.0).to(tl.float32)
            if not HAS_ZEROS:
                z = -8.0 * s  # SYMMETRIC_INT4_ZERO (kernels may only read constexpr globals)
            w_even = (packed & 0xF).to(tl.float32) * s + z
            w_odd = (packed >> 4).to(tl.float32) * s + z
            x_even = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            x_odd = tl.load(x_rows + kk[None, :] + 1, mask=m_mask[:, None] & (kk + 1 < K)[None, :], other=0.0)
            if USE_DOT:
                if IEEE:
                    acc += tl.dot(x_even.to(tl.float32), tl.trans(w_even), input_precision="ieee")
                    acc += tl.dot(x_odd.to(tl.float32), tl.trans(w_odd), input_precision="ieee")
                else:
                    acc += tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)))
                    acc += tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)))
            else:
                acc += tl.sum(x_even.to(tl.float32)[:, None, :] * w_even[None, :, :], axis=2)
                acc += tl.sum(x_odd.to(tl.float32)[:, None, :] * w_odd[None, :, :], axis=2)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            w_mask = n_mask[:, None] & k_ok[None, :]
            q = tl.load(QW + w_rows + kk[None, :], mask=w_mask, other=0)
            if GROUP % BLOCK_K == 0:
                s = tl.load(S + s_rows + k0 // GROUP, mask=n_mask[:, None], other=0.0).to(tl.float32)
            else:
                s = tl.load(S + s_rows + (kk // GROUP)[None, :], mask=w_mask, other=0.0).to(tl.float32)
            w = q.to(tl.float32) * s
            x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            if USE_DOT:
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)))
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    out = OUT + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------------------------------ reference
def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned INT4 codes 0..15 (uint8) or signed INT8 codes (int8), `[N, Kp]`, padding included."""
    if bits == 8:
        return qweight
    return torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).reshape(qweight.shape[0], qweight.shape[1] * 2)


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                         group_size: int, bits: int, k: int) -> torch.Tensor:
    """The float32 weight `[N, k]` (padding columns dropped); bit-exact with GGUF's reference dequantizer.
    The layout's one dequantizer: `edge_mmm.quant.packed.PackedWeight.dequantize` calls it."""
    n, g = scales.shape
    q = unpack_codes(qweight, bits).to(torch.float32).view(n, g, group_size)
    s = scales.to(torch.float32).unsqueeze(-1)
    if zeros is not None:
        w = q * s + zeros.to(torch.float32).unsqueeze(-1)
    elif bits == 4:
        w = (q - SYMMETRIC_INT4_ZERO) * s
    else:
        w = q * s
    return w.view(n, g * group_size)[:, :k]


def _matmul_reference(x, qweight, scales, zeros, group_size, bits):
    w = dequantize_reference(qweight, scales, zeros, group_size, bits, x.shape[-1])
    return (x.float() @ w.t()).to(x.dtype)


def w4a16_matmul_reference(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """Dequantize the INT4 weight to float32, multiply in float32, return in x.dtype."""
    return _matmul_reference(x, qweight, scales, zeros, group_size, 4)


def w8a16_matmul_reference(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """Dequantize the INT8 weight to float32, multiply in float32, return in x.dtype."""
    return _matmul_reference(x, qweight, scales, zeros, group_size, 8)


# ------------------------------------------------------------------------------------------ launch
def _check(op, bits, x, qweight, scales, zeros, group_size):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "qweight", qweight, ndim=(2,), dtypes=(torch.uint8,) if bits == 4 else (torch.int8,))
    check_tensor(op, "scales", scales, ndim=(2,), dtypes=FLOAT_DTYPES)
    if zeros is not None:
        if bits == 8:
            raise InputError(f"{op}: INT8 weights are symmetric; zeros must be None")
        check_tensor(op, "zeros", zeros, ndim=(2,), dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise InputError(f"{op}: x must have at least one dimension")
    if not isinstance(group_size, int) or group_size <= 0 or (bits == 4 and group_size % 2):
        raise InputError(f"{op}: group_size must be a positive{' even' if bits == 4 else ''} integer, "
                         f"got {group_size!r}")
    n, k = qweight.shape[0], x.shape[-1]
    groups = cdiv(k, group_size)
    stored = groups * group_size // (2 if bits == 4 else 1)
    if qweight.shape[1] != stored:
        raise InputError(f"{op}: x has K={k} features, so qweight must be [N, {stored}] "
                         f"({groups} groups of {group_size}), got {tuple(qweight.shape)}")
    if tuple(scales.shape) != (n, groups):
        raise InputError(f"{op}: scales must be [{n}, {groups}], got {tuple(scales.shape)}")
    if zeros is not None and tuple(zeros.shape) != (n, groups):
        raise InputError(f"{op}: zeros must be [{n}, {groups}], got {tuple(zeros.shape)}")
    check_same_device(op, x=x, qweight=qweight, scales=scales, zeros=zeros)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None:
            check_contiguous(op, name, t, "weights are streamed row by row")


def default_config(m: int, n: int, k: int, bits: int, device: torch.device) -> MatmulConfig:
    """Tile sizes by shape: GEMV with split-K for M <= 4, a tensor-core GEMM tile above."""
    if m <= GEMV_MAX_M:
        block_n, block_k = 32, 128 if bits == 4 else 64
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            sms = 2  # the interpreter runs programs one by one: fewest programs is fastest
        k_blocks = cdiv(k, block_k)
        split = max(1, min(k_blocks, cdiv(2 * sms, cdiv(n, block_n)), 16))
        return MatmulConfig(next_power_of_2(m), block_n, block_k, split, num_warps=4)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return MatmulConfig(block_m, 64, 64, 1, num_warps=4)


def _launch(op, bits, x, qweight, scales, zeros, group_size, config):
    k = x.shape[-1]
    n = qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    if k == 0:
        return out.zero_().view(*lead, n)
    cfg = config or default_config(m, n, k, bits, x.device)
    use_dot = m > GEMV_MAX_M if config is None else cfg.block_m >= 16
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = cdiv(k, k_per_split)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    stride_os = 0 if split == 1 else target.stride(0)
    grid = (cdiv(n, cfg.block_n), split, cdiv(m, cfg.block_m))
    _wxa16_matmul_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, target, m, n, k, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), stride_os, n,
        GROUP=group_size, BITS=bits, HAS_ZEROS=zeros is not None,
        USE_DOT=use_dot, IEEE=fp32_dot(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    if split > 1:
        out.copy_(target.sum(0))  # fixed-order reduction of the K splits: deterministic
    return out.view(*lead, n)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int, *, config: Optional[MatmulConfig] = None) -> torch.Tensor:
    """`x @ W.T` for INT4 `W[N, K]` packed as `qweight [N, Kp/2] uint8`; x `[..., K]` -> `[..., N]` in x.dtype."""
    _check("w4a16_matmul", 4, x, qweight, scales, zeros, group_size)
    if not use_triton(x, qweight, scales, zeros):
        return w4a16_matmul_reference(x, qweight, scales, zeros, group_size)
    return _launch("w4a16_matmul", 4, x, qweight, scales, zeros, group_size, config)


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int, *, config: Optional[MatmulConfig] = None) -> torch.Tensor:
    """`x @ W.T` for INT8 `W[N, K]` packed as `qweight [N, Kp] int8`; `zeros` must be None (symmetric)."""
    _check("w8a16_matmul", 8, x, qweight, scales, zeros, group_size)
    if not use_triton(x, qweight, scales, zeros):
        return w8a16_matmul_reference(x, qweight, scales, zeros, group_size)
    return _launch("w8a16_matmul", 8, x, qweight, scales, zeros, group_size, config)
