"""Rotary position embedding for q and k in one launch (GQA: q and k may have different head counts).

Each head vector x is split into pairs (x_lo, x_hi) rotated by the angle of its position:

    out_lo = x_lo * cos_lo - x_hi * sin_lo
    out_hi = x_hi * cos_hi + x_lo * sin_hi

- `interleaved=False` (Hugging Face "rotate_half", what edge_mmm.models.llama uses): lo = d, hi = d + D/2.
- `interleaved=True` (Meta / GPT-J / llama.cpp "normal" rope): lo = 2i, hi = 2i + 1.

Tables: `cos`/`sin` are `[P, D]` (the full-width HF tables: entries indexed like x) or `[P, D/2]` (one
angle per pair). Row r of the table is used for token t when `positions` is None (r = t, e.g. the rows
llama's `Rotary(start, T)` returns), else r = positions[t] (`[T]`) or positions[b, t] (`[B, T]`).
Out of place: q and k are `[B, H, T, D]` with any strides (the transposed views the model makes);
the results are new contiguous tensors of the same shape and dtype. Math in float32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels.dispatch import FLOAT_DTYPES, check_same_device, check_tensor, jit, next_power_of_2, use_triton

tl = None  # triton.language, bound by dispatch.jit on first launch


@jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, POS, T, HQ, HK, HALF,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
                 s_tab, s_pos_b,
                 HAS_POS: tl.constexpr, FULL_TABLE: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    if HAS_POS:
        row = tl.load(POS + b * s_pos_b + t).to(tl.int64)
    else:
        row = t.to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    if INTERLEAVED:
        lo = 2 * i
        hi = 2 * i + 1
    else:
        lo = i
        hi = i + HALF
    if FULL_TABLE:
        c_lo = tl.load(COS + row * s_tab + lo, mask=i_ok, other=0.0).to(tl.float32)
        c_hi = tl.load(COS + row * s_tab + hi, mask=i_ok, other=0.0).to(tl.float32)
        s_lo = tl.load(SIN + row * s_tab + lo, mask=i_ok, other=0.0).to(tl.float32)
        s_hi = tl.load(SIN + row * s_tab + hi, mask=i_ok, other=0.0).to(tl.float32)
    else:
        c_lo = tl.load(COS + row * s_tab + i, mask=i_ok, other=0.0).to(tl.float32)
        s_lo = tl.load(SIN + row * s_tab + i, mask=i_ok, other=0.0).to(tl.float32)
        c_hi = c_lo
        s_hi = s_lo
    # q heads
    h = tl.arange(0, BLOCK_HQ)
    mask = (h < HQ)[:, None] & i_ok[None, :]
    src = Q + b.to(tl.int64) * sq_b + t.to(tl.int64) * sq_t + h[:, None].to(tl.int64) * sq_h
    dst = QO + b.to(tl.int64) * sqo_b + t.to(tl.int64) * sqo_t + h[:, None].to(tl.int64) * sqo_h
    x_lo = tl.load(src + lo[None, :], mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(src + hi[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + lo[None, :], (x_lo * c_lo[None, :] - x_hi * s_lo[None, :]).to(QO.dtype.element_ty), mask=mask)
    tl.store(dst + hi[None, :], (x_hi * c_hi[None, :] + x_lo * s_hi[None, :]).to(QO.dtype.element_ty), mask=mask)
    # k heads
    h = tl.arange(0, BLOCK_HK)
    mask = (h < HK)[:, None] & i_ok[None, :]
    src = K + b.to(tl.int64) * sk_b + t.to(tl.int64) * sk_t + h[:, None].to(tl.int64) * sk_h
    dst = KO + b.to(tl.int64) * sko_b + t.to(tl.int64) * sko_t + h[:, None].to(tl.int64) * sko_h
    x_lo = tl.load(src + lo[None, :], mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(src + hi[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + lo[None, :], (x_lo * c_lo[None, :] - x_hi * s_lo[None, :]).to(KO.dtype.element_ty), mask=mask)
    tl.store(dst + hi[None, :], (x_hi * c_hi[None, :] + x_lo * s_hi[None, :]).to(KO.dtype.element_ty), mask=mask)


def _table_rows(cos, sin, positions, b, t):
    """cos/sin gathered to `[B or 1, 1, T, W]` for broadcasting against `[B, H, T, D]`."""
    if positions is None:
        c, s = cos[:t], sin[:t]
        return c[None, None].float(), s[None, None].float()
    pos = positions.long()
    if pos.dim() == 1:
        return cos[pos][None, None].float(), sin[pos][None, None].float()
    return cos[pos][:, None].float(), sin[pos][:, None].float()


def _rotate_reference(x, c, s, interleaved):
    d = x.shape[-1]
    xf = x.float()
    if interleaved:
        x_lo, x_hi = xf[..., 0::2], xf[..., 1::2]
        if c.shape[-1] == d:
            c_lo, c_hi, s_lo, s_hi = c[..., 0::2], c[..., 1::2], s[..., 0::2], s[..., 1::2]
        else:
            c_lo = c_hi = c
            s_lo = s_hi = s
        out = torch.stack((x_lo * c_lo - x_hi * s_lo, x_hi * c_hi + x_lo * s_hi), dim=-1).flatten(-2)
    else:
        if c.shape[-1] != d:
            c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        half = d // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        out = xf * c + rotated * s
    return out.to(x.dtype)


def rope_reference(q, k, cos, sin, positions=None, interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch RoPE (float32 math); same conventions and shapes as `rope`."""
    c, s = _table_rows(cos, sin, positions, q.shape[0], q.shape[2])
    return _rotate_reference(q, c, s, interleaved), _rotate_reference(k, c, s, interleaved)


def _check(q, k, cos, sin, positions):
    op = "rope"
    check_tensor(op, "q", q, ndim=(4,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "k", k, ndim=(4,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "cos", cos, ndim=(2,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "sin", sin, ndim=(2,), dtypes=FLOAT_DTYPES)
    b, _, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise InputError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, D] with one B, T, D")
    if d % 2:
        raise InputError(f"rope: head dim must be even, got {d}")
    if cos.shape != sin.shape or cos.shape[1] not in (d, d // 2):
        raise InputError(f"rope: cos/sin must both be [P, {d}] or [P, {d // 2}], got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if positions is None:
        if cos.shape[0] < t:
            raise InputError(f"rope: without positions the table needs >= {t} rows (one per token), "
                             f"got {cos.shape[0]}")
    else:
        check_tensor(op, "positions", positions, ndim=(1, 2), dtypes=(torch.int32, torch.int64))
        if positions.shape[-1] != t or (positions.dim() == 2 and positions.shape[0] != b):
            raise InputError(f"rope: positions must be [{t}] or [{b}, {t}], got {tuple(positions.shape)}")
    check_same_device(op, q=q, k=k, cos=cos, sin=sin, positions=positions)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: Optional[torch.Tensor] = None, interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[B, Hq, T, D]` and k `[B, Hk, T, D]`; returns new `(q, k)` (out of place)."""
    _check(q, k, cos, sin, positions)
    if not use_triton(q, k, cos, sin, positions):
        return rope_reference(q, k, cos, sin, positions, interleaved)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()  # small tables; one row stride for both
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0:
        return qo, ko
    pos = positions.contiguous() if positions is not None else cos  # cos: placeholder when HAS_POS is False
    s_pos_b = pos.stride(0) if positions is not None and positions.dim() == 2 else 0
    _rope_kernel[(b * t,)](q, k, qo, ko, cos, sin, pos, t, hq, hk, d // 2,
                           *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
                           cos.stride(0), s_pos_b,
                           HAS_POS=positions is not None, FULL_TABLE=cos.shape[1] == d, INTERLEAVED=interleaved,
                           BLOCK_HQ=next_power_of_2(hq), BLOCK_HK=next_power_of_2(hk),
                           BLOCK_HALF=next_power_of_2(d // 2))
    return qo, ko
