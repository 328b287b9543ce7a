"""Flash attention for prefill: softmax(q k^T * scale + mask) v without materializing the score matrix.

    q `[B, Hq, Sq, D]`, k / v `[B, Hkv, Sk, D]` (Hq a multiple of Hkv: GQA), out `[B, Hq, Sq, D]`.

Masks:
- `causal=False`: every query sees every key (SigLIP, Whisper encoder, cross-attention).
- `causal=True`: queries are the last Sq of Sk positions (a chunk after a cached prefix when Sq < Sk),
  so query i sees keys j <= i + Sk - Sq.
- `image_block_ids` `[B, Sk]` (int, with `causal=True`): keys with the same non-zero id form one image
  block whose tokens also see each other bidirectionally; id 0 marks text (plain causal).
- `key_mask` `[B, Sk]` (bool, True = a real key): padding keys are hidden from every query (SigLIP's
  padded patches). A query that sees no key at all gets zeros.
Online softmax in float32 (base-2 exponentials); one program per `BLOCK_M` queries of one head.
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
def _flash_attention_kernel(Q, K, V, O, SEG, KMASK, Sq, Sk, HQ, GROUP, qk_scale,
                            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, sseg_b, skm_b,
                            HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                            HAS_KMASK: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Sq
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    q_pos = offs_m + (Sk - Sq)  # absolute position of each query among the keys
    if HAS_SEG:
        q_seg = tl.load(SEG + b * sseg_b + q_pos, mask=m_ok, other=0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = Sk
    if CAUSAL and not HAS_SEG:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + (Sk - Sq))  # later keys are masked for every query here
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Sk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        allowed = n_ok[None, :]
        if CAUSAL:
            visible = offs_n[None, :] <= q_pos[:, None]
            if HAS_SEG:
                k_seg = tl.load(SEG + b * sseg_b + offs_n, mask=n_ok, other=0)
                visible = visible | ((q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0))
            allowed = allowed & visible
        if HAS_KMASK:
            real = tl.load(KMASK + b * skm_b + offs_n, mask=n_ok, other=0)
            allowed = allowed & (real != 0)[None, :]
        # a row with nothing visible yet stays zero (see online_softmax)
        m_i, l_i, acc = attend_block(q, k, v, allowed, m_i, l_i, acc, qk_scale, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def attention_mask(sq: int, sk: int, causal: bool, image_block_ids: Optional[torch.Tensor], device,
                   key_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The boolean mask `[B or 1, 1, Sq, Sk]` (True = visible) that `flash_attention` applies, or None."""
    mask = None
    if causal:
        q_pos = torch.arange(sk - sq, sk, device=device)
        mask = (torch.arange(sk, device=device)[None, :] <= q_pos[:, None])[None, None]
        if image_block_ids is not None:
            seg = image_block_ids.long()
            q_seg = seg[:, sk - sq:]
            same = (q_seg[:, :, None] == seg[:, None, :]) & (q_seg[:, :, None] != 0)
            mask = mask | same[:, None]
    if key_mask is not None:
        keys = key_mask.bool()[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def flash_attention_reference(q, k, v, causal: bool = False, scale: Optional[float] = None,
                              image_block_ids: Optional[torch.Tensor] = None,
                              key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention in float32 with an explicit mask, via F.scaled_dot_product_attention (fully masked rows: 0)."""
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    mask = attention_mask(q.shape[2], k.shape[2], causal, image_block_ids, q.device, key_mask)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # SDPA gives NaN where no key is visible
    return out.to(q.dtype)


def _check(q, k, v, causal, image_block_ids, key_mask):
    op = "flash_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=(4,), dtypes=FLOAT_DTYPES)
    b, hq, sq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise InputError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         f"[B, Hq, Sq, D] and [B, Hkv, Sk, D] with one B and D")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise InputError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if hq % k.shape[1]:
        raise InputError(f"{op}: query heads {hq} must be a multiple of key/value heads {k.shape[1]}")
    if d > 256:
        raise InputError(f"{op}: head dim {d} > 256 is not supported")
    if causal and sq > k.shape[2]:
        raise InputError(f"{op}: causal attention needs Sq <= Sk (queries are the last positions), "
                         f"got Sq={sq}, Sk={k.shape[2]}")
    if image_block_ids is not None:
        check_tensor(op, "image_block_ids", image_block_ids, ndim=(2,), dtypes=(torch.int32, torch.int64))
        if not causal:
            raise InputError(f"{op}: image_block_ids only relaxes a causal mask; pass causal=True")
        if tuple(image_block_ids.shape) != (b, k.shape[2]):
            raise InputError(f"{op}: image_block_ids must be [{b}, {k.shape[2]}], got {tuple(image_block_ids.shape)}")
    if key_mask is not None:
        check_tensor(op, "key_mask", key_mask, ndim=(2,), dtypes=(torch.bool,))
        if tuple(key_mask.shape) != (b, k.shape[2]):
            raise InputError(f"{op}: key_mask must be [{b}, {k.shape[2]}], got {tuple(key_mask.shape)}")
    check_same_device(op, q=q, k=k, v=v, image_block_ids=image_block_ids, key_mask=key_mask)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: Optional[float] = None, image_block_ids: Optional[torch.Tensor] = None,
                    key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Prefill attention; q `[B, Hq, Sq, D]`, k/v `[B, Hkv, Sk, D]` (any strides, D contiguous) -> `[B, Hq, Sq, D]`."""
    _check(q, k, v, causal, image_block_ids, key_mask)
    if not use_triton(q, k, v, image_block_ids, key_mask):
        return flash_attention_reference(q, k, v, causal, scale, image_block_ids, key_mask)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    if sk == 0:
        return out.zero_()
    seg = image_block_ids.contiguous() if image_block_ids is not None else q  # q: unused placeholder
    kmask = key_mask.to(torch.int8) if key_mask is not None else q
    block_d = max(16, next_power_of_2(d))
    block_m = 64 if sq >= 64 else max(16, next_power_of_2(sq))
    block_n = 64 if block_d <= 64 else 32
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (cdiv(sq, block_m), b * hq)
    _flash_attention_kernel[grid](
        q, k, v, out, seg, kmask, sq, sk, hq, hq // hkv, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        seg.stride(0) if image_block_ids is not None else 0, kmask.stride(0) if key_mask is not None else 0,
        HEAD_DIM=d, CAUSAL=causal, HAS_SEG=image_block_ids is not None, HAS_KMASK=key_mask is not None,
        IEEE=fp32_dot(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8)
    return out
