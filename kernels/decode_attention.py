"""Split-KV flash decoding: one new query token per sequence against a long KV cache.

    q `[B, Hq, D]`, k_cache / v_cache `[B, Hkv, S_max, D]` (any strides, D contiguous: the slices of
    a preallocated cache), seq_lens `[B]` = valid cache positions per sequence (>= 1) -> out `[B, Hq, D]`.

Stage 1 splits each sequence's cache into chunks; one program handles one chunk for one KV head and
all the query heads that share it (GQA rows padded to a tensor-core tile), writing an unnormalized
partial output and its log-sum-exp. Stage 2 merges the chunks: out = sum_s w_s o_s / sum_s w_s l_s.
Batch 1 with a 4k cache thus runs on (heads x chunks) programs instead of (heads).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels.dispatch import (FLOAT_DTYPES, cdiv, check_same_device, check_tensor, fp32_dot, jit,
                                       next_power_of_2, use_triton)
from edge_mmm.kernels.online_softmax import attend_block

tl = None  # triton.language, bound by dispatch.jit on first launch

LOG2E = 1.4426950408889634


@jit
def _decode_attention_kernel(Q, K, V, LENS, PART_O, PART_M, PART_L, HKV, GROUP, CHUNK, NUM_SPLITS, qk_scale,
                             sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                             HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hk = (bh % HKV).to(tl.int64)
    seq_len = tl.load(LENS + b).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    heads = hk * GROUP + g  # the query heads reading this KV head
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, seq_len)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * sk_b + hk * sk_h + offs_n[:, None].to(tl.int64) * sk_s + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * sv_b + hk * sv_h + offs_n[:, None].to(tl.int64) * sv_s + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        m_i, l_i, acc = attend_block(q, k, v, n_ok[None, :], m_i, l_i, acc, qk_scale, IEEE)
    # partials laid out [B, Hq, NUM_SPLITS(, D)]; an empty chunk leaves m = -inf, l = 0, acc = 0
    row = (b * HKV * GROUP + heads) * NUM_SPLITS + split
    tl.store(PART_M + row, m_i, mask=g_ok)
    tl.store(PART_L + row, l_i, mask=g_ok)
    tl.store(PART_O + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@jit
def _decode_combine_kernel(PART_O, PART_M, PART_L, OUT, NUM_SPLITS, so_b, so_h, HQ,
                           HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HQ
    h = bh % HQ
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.load(PART_M + bh * NUM_SPLITS + s, mask=s_ok, other=float("-inf"))
    l = tl.load(PART_L + bh * NUM_SPLITS + s, mask=s_ok, other=0.0)
    o = tl.load(PART_O + (bh * NUM_SPLITS + s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(OUT + b * so_b + h * so_h + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


def decode_attention_reference(q, k_cache, v_cache, seq_lens, scale: Optional[float] = None) -> torch.Tensor:
    """Per-sequence float32 attention of q `[B, Hq, D]` over the first seq_lens[b] cache positions."""
    b, hq, d = q.shape
    g = hq // k_cache.shape[1]
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        k = k_cache[i, :, :n].float().repeat_interleave(g, dim=0)
        v = v_cache[i, :, :n].float().repeat_interleave(g, dim=0)
        o = torch.nn.functional.scaled_dot_product_attention(q[i, :, None].float(), k, v, scale=scale)
        out[i] = o[:, 0].to(q.dtype)
    return out


def _check(q, k_cache, v_cache, seq_lens):
    op = "decode_attention"
    check_tensor(op, "q", q, ndim=(3,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "k_cache", k_cache, ndim=(4,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "v_cache", v_cache, ndim=(4,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "seq_lens", seq_lens, ndim=(1,), dtypes=(torch.int32, torch.int64))
    b, hq, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise InputError(f"{op}: q {tuple(q.shape)} must be [B, Hq, D] and the caches [B, Hkv, S, D], got "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise InputError(f"{op}: q and the caches must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if hq % k_cache.shape[1]:
        raise InputError(f"{op}: query heads {hq} must be a multiple of KV heads {k_cache.shape[1]}")
    if d > 256:
        raise InputError(f"{op}: head dim {d} > 256 is not supported")
    if seq_lens.shape[0] != b:
        raise InputError(f"{op}: seq_lens must be [{b}], got {tuple(seq_lens.shape)}")
    check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: Optional[float] = None, num_splits: Optional[int] = None) -> torch.Tensor:
    """One query token per sequence over its cache; see the module docstring for shapes.

    `seq_lens` values must lie in [1, S_max] (not checked on the device, to avoid a sync per token).
    """
    _check(q, k_cache, v_cache, seq_lens)
    if not use_triton(q, k_cache, v_cache, seq_lens):
        return decode_attention_reference(q, k_cache, v_cache, seq_lens, scale)
    b, hq, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    block_d = max(16, next_power_of_2(d))
    block_n = 64 if block_d <= 64 else 32
    if num_splits is None:
        if q.is_cuda:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = max(1, min(cdiv(s_max, 256), cdiv(2 * sms, b * hkv)))
        else:
            num_splits = max(1, min(cdiv(s_max, 256), 4))
    if s_max == 0:
        return out.zero_()
    chunk = cdiv(cdiv(s_max, num_splits), block_n) * block_n
    num_splits = cdiv(s_max, chunk)
    group = hq // hkv
    part_o = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    _decode_attention_kernel[(b * hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, part_o, part_m, part_l, hkv, group, chunk, num_splits, scale * LOG2E,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEAD_DIM=d, IEEE=fp32_dot(q.dtype), BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=4)
    _decode_combine_kernel[(b * hq,)](part_o, part_m, part_l, out, num_splits, out.stride(0), out.stride(1), hq,
                                      HEAD_DIM=d, BLOCK_S=next_power_of_2(num_splits), BLOCK_D=block_d)
    return out
