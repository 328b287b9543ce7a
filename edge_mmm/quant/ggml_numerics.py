"""llama.cpp's CPU arithmetic (ggml, x86 AVX2 build), reproduced in torch for token parity.

llama.cpp does not compute a GGUF model in fp32. On its CPU backend:
- every matmul with a Q4_0/Q4_1/Q8_0 weight first quantizes the fp32 activations to 8 bits in blocks
  of 32 (`quantize_row_q8_0` / `quantize_row_q8_1`: `d = amax / 127` stored as fp16,
  `q = round_half_even(x * (127 / amax))`, for Q8_1 also `s = fp16(d * sum(q))`), then takes integer
  dot products per block (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0` and llamafile's tinyBLAS
  for Q8_0): per block 8 int32 lanes of 4 products each, accumulated over blocks as
  `lane = fma(d_w * d_x, lane, acc)` in fp32, then a fixed horizontal sum (`hsum_float_8`), plus for
  Q4_1 the offset term `sum_b m_w * s_x` in fp32;
- the KV cache is fp16; attention (flash attention off, llama-cpp-python's default) multiplies fp16
  K with Q rounded to fp16 and fp16 V with the softmax weights rounded to fp16 (tinyBLAS: 8 fp32
  lanes over the reduction, then `hsum`); the softmax uses ggml's polynomial `expf` and a double sum;
- RMSNorm sums squares in double and scales by `1 / sqrtf(mean + eps)`; RoPE angles are built by
  repeated fp32 multiplication `theta *= theta_scale`; SwiGLU uses the polynomial `expf` too.

The integer parts are exact here; fp32 steps follow ggml's order (fma emulated in float64, exact up
to rare double rounding). Everything runs on CPU in float32/float64 and is far slower than the plain
path: it is a numerics reference, selected with `Numerics.llama_cpp()` (edge_mmm.models.llama).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from typing import Optional, Tuple

import numpy as np
import torch

from edge_mmm.errors import InputError
from edge_mmm.quant.packed import SYMMETRIC_INT4_ZERO, PackedWeight

BLOCK = 32  # QK8_0 / QK8_1 / QK4_1
LANES = 8  # AVX2 fp32 lanes


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16 (round to nearest even, as F16C) -> fp32."""
    return x.to(torch.float16).to(torch.float32)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add, rounded once (float64 holds every product of the operands used here)."""
    return (a.double() * b.double() + c.double()).float()


def hsum8(v: torch.Tensor) -> torch.Tensor:
    """`hsum_float_8` over the last dim (8 lanes): ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)) in fp32."""
    a = v[..., 4:] + v[..., :4]          # 128-bit halves
    b = a[..., 0:2] + a[..., 2:4]        # movehl
    return b[..., 0] + b[..., 1]         # movehdup + add_ss


def quantize_q8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AVX2 `quantize_row_q8_1` of `x[..., K]` (K % 32 == 0): codes `[..., G, 32]` (float), `d` (fp16
    value as fp32) `[..., G]` and `s = fp16(d * sum q)` `[..., G]`. Q8_0 is the same without `s`."""
    if x.shape[-1] % BLOCK:
        raise InputError(f"ggml activation quantization needs K % {BLOCK} == 0, got K={x.shape[-1]}")
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    # tensor / tensor: torch evaluates `scalar / tensor` as a reciprocal times the scalar (not IEEE 127/amax)
    inv = torch.where(amax != 0, torch.full_like(amax, 127.0) / torch.where(amax != 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    q = torch.round(xb * inv.unsqueeze(-1))  # round half to even, as _mm256_round_ps(_MM_ROUND_NEAREST)
    s = fp16_round(d * q.sum(-1))            # int sum is exact in fp32 (|sum| <= 32 * 127)
    return q, fp16_round(d), s


_FOUR_ONES = torch.ones(4, 1)


def _lane_dots(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Integer block dot products split into the 8 AVX2 lanes: `[M, G, 32] x [N, G, 32] -> [M, N, G, 8]`.

    Lane `l` of block `g` holds elements `4l..4l+3` (maddubs + madd). Exact in fp32 (|lane| < 2^16)."""
    m, g = qx.shape[0], qx.shape[1]
    n = qw.shape[0]
    w = qw.reshape(n, g * BLOCK)
    rows = [((w * row.reshape(1, g * BLOCK)).view(-1, 4) @ _FOUR_ONES).view(n, g, LANES) for row in qx]
    return torch.stack(rows) if m > 1 else rows[0].unsqueeze(0)


def _accumulate(scale: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """`acc = fma(scale_g, lanes_g, acc)` over blocks g in order; `scale [M, N, G]`, `lanes [M, N, G, 8]`."""
    s = scale.double()
    p = lanes.double()
    acc = torch.zeros(lanes.shape[:2] + (LANES,), dtype=torch.float64)
    for g in range(lanes.shape[2]):
        acc = (s[:, :, g, None] * p[:, :, g] + acc).float().double()
    return acc.float()


def weight_codes(packed: PackedWeight) -> torch.Tensor:
    """The integer weight codes as llama.cpp's dot products see them, `[N, G, 32]` float32
    (Q4_0: `q - 8`; Q4_1: `q`; Q8_0: signed `q`)."""
    n, k = packed.shape
    codes = packed.codes().to(torch.float32).view(n, k // BLOCK, BLOCK)
    if packed.bits == 4 and packed.zeros is None:
        codes = codes - SYMMETRIC_INT4_ZERO
    return codes


def q8_matmul(x: torch.Tensor, packed: PackedWeight, codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x @ W.T` as llama.cpp's CPU backend computes it for a GGUF Q4_0 / Q4_1 / Q8_0 weight (`[..., N]`).
    `codes` may pass a cached `weight_codes(packed)`."""
    if packed.group_size != BLOCK or packed.padded_in_features != packed.in_features:
        raise InputError(f"llama.cpp numerics need GGUF blocks of {BLOCK} along K, got group size "
                         f"{packed.group_size} for K={packed.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    qx, dx, sx = quantize_q8(x2)                                        # [M, G, 32], [M, G]
    n, k = packed.shape
    g = k // BLOCK
    codes = weight_codes(packed) if codes is None else codes
    dw = packed.scales.to(torch.float32)                                # fp16 values
    lanes = _lane_dots(qx, codes)
    scale = dw[None] * dx[:, None]                                      # exact: fp16 x fp16 in fp32
    out = hsum8(_accumulate(scale, lanes))                              # [M, N]
    if packed.zeros is not None:                                        # Q4_1: + sum_b m_b * s_b in fp32
        m = packed.zeros.to(torch.float32)
        terms = m[None] * sx[:, None]                                   # exact products
        summs = torch.zeros_like(out)
        for b in range(g):
            summs = summs + terms[:, :, b]
        out = out + summs
    return out.reshape(*lead, n).to(x.dtype)


def q8_0_from_dequantized(weight: torch.Tensor) -> PackedWeight:
    """The Q8_0 blocks of a weight that is the exact dequantization of GGUF Q8_0 (a tied embedding).

    Re-running `quantize_row_q8_0_ref` on `q * d` recovers `d` and `q` exactly (the block maximum sits
    on +-127); anything else is an error, because it would not be llama.cpp's head."""
    w = weight.detach().float()
    n, k = w.shape
    if k % BLOCK:
        raise InputError(f"the LM head (K={k}) is not in blocks of {BLOCK}; llama.cpp numerics need GGUF Q8_0")
    wb = w.reshape(n, k // BLOCK, BLOCK)
    d = wb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, torch.ones_like(d) / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(wb * inv.unsqueeze(-1))
    d16 = d.to(torch.float16)
    packed = PackedWeight(q.to(torch.int8).reshape(n, k), d16, None, bits=8, group_size=BLOCK, shape=(n, k))
    if not torch.equal(packed.dequantize(torch.float32), w):
        raise InputError("the LM head is not a GGUF Q8_0 tensor (its values are not q * fp16 scale per block "
                         "of 32); llama.cpp numerics support Q8_0 heads only")
    return packed


# ---------------------------------------------------------------- elementwise ops
def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _float(i: torch.Tensor) -> torch.Tensor:
    return i.contiguous().view(torch.float32)


def ggml_expf(x: torch.Tensor) -> torch.Tensor:
    """ggml's AVX2 `ggml_v_expf` (ARM optimized-routines polynomial, max error ~1.5 ulp), bit for bit."""
    x = x.float()
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    r = f(float.fromhex("0x1.8p23"))
    z = fma32(x, f(float.fromhex("0x1.715476p+0")), r)
    n = z - r
    b = fma32(-n, f(float.fromhex("0x1.7f7d1cp-20")), fma32(-n, f(float.fromhex("0x1.62e4p-1")), x))
    e = torch.bitwise_left_shift(_bits(z), 23)
    k = _float(e + _bits(f(1.0)))
    c = n.abs() > 126
    u = b * b
    j = fma32(fma32(fma32(f(float.fromhex("0x1.0e4020p-7")), b, f(float.fromhex("0x1.573e2ep-5"))), u,
                    fma32(f(float.fromhex("0x1.555e66p-3")), b, f(float.fromhex("0x1.fffdb6p-2")))),
              u, f(float.fromhex("0x1.ffffecp-1")) * b)
    out = fma32(k, j, k)
    if bool(c.any()):
        g = torch.where(n <= 0, torch.tensor(0x82000000 - (1 << 32), dtype=torch.int32),
                        torch.tensor(0, dtype=torch.int32))
        s1 = _float(g + 0x7F000000)
        s2 = _float(e - g)
        d = n.abs() > 192
        out = torch.where(d, s1 * s1, torch.where(c, fma32(s2, j, s2) * s1, out))
    return out


def ggml_silu(x: torch.Tensor) -> torch.Tensor:
    """`ggml_v_silu`: x / (1 + expf(-x)) with ggml's expf."""
    x = x.float()
    return x / (ggml_expf(0.0 - x) + 1.0)


def ggml_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`ggml_compute_forward_rms_norm_f32` then `mul` by the weight: double sum of fp32 squares."""
    x = x.float()
    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()
    # sqrtf is correctly rounded; torch's fp32 sqrt is not (SIMD approximation), float64 sqrt rounded is
    root = torch.sqrt((mean + torch.tensor(eps, dtype=torch.float32)).double()).float()
    scale = torch.ones_like(root) / root
    return (x * scale) * weight.float()


@functools.lru_cache(maxsize=1)
def _libm():
    """glibc's powf/cosf/sinf (what ggml calls); None where there is no glibc libm."""
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    for fn in (lib.cosf, lib.sinf):
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    lib.powf.restype, lib.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    return lib


@functools.lru_cache(maxsize=1 << 16)
def _rope_row(pos: int, head_dim: int, base: float, factors: Optional[Tuple[float, ...]]):
    """cos/sin of one position, as `ggml_rope_cache_init`: theta = pos, then `theta *= powf(base, -2/d)`
    in fp32 per pair; powf/cosf/sinf from libm (double-precision rounded where there is no glibc). Not
    numpy's float32 power: numpy 2 computes it with its own SIMD code on AVX-512 hosts, one ulp away from
    glibc's powf for SmolLM2's base (0.6978306 vs 0.69783056), which moved every RoPE angle and so the logits
    of the bit-identical parity test on those hosts only."""
    lib = _libm()
    exponent = np.float32(-2.0 / head_dim)
    theta_scale = (np.float32(lib.powf(float(np.float32(base)), float(exponent))) if lib is not None
                   else np.float32(math.pow(float(np.float32(base)), float(exponent))))
    theta = np.float32(pos)
    cos, sin = [], []
    for i in range(head_dim // 2):
        t = theta if factors is None else np.float32(theta / np.float32(factors[i]))
        if lib is not None:
            cos.append(lib.cosf(float(t)))
            sin.append(lib.sinf(float(t)))
        else:
            cos.append(float(np.float32(math.cos(float(t)))))
            sin.append(float(np.float32(math.sin(float(t)))))
        theta = np.float32(theta * theta_scale)
    return cos, sin


def ggml_rope_tables(start: int, length: int, head_dim: int, base: float,
                     freq_factors: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[length, head_dim]` in the rotate-half layout (both halves hold the pair's value)."""
    factors = None if freq_factors is None else tuple(float(f) for f in freq_factors.float())
    rows = [_rope_row(p, head_dim, float(base), factors) for p in range(start, start + length)]
    cos = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    sin = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


def ggml_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs `(i, i + d/2)` as ggml's compiled `rotate_pairs`: `fma(x0, cos, -(x1*sin))`,
    `fma(x0, sin, x1*cos)` (the compiler contracts the first product of each line)."""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((fma32(x0, c, -(x1 * s)), fma32(x0, s, x1 * c)), -1)


def _f16_dot_lanes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tinyBLAS F16 x F16 -> F32 over the last dim of `a [..., K]` and `b [..., K]` (broadcast):
    8 fp32 lanes (element l in lane l % 8) accumulated in order, then `hsum`. fp16 products are exact
    in fp32, so each fma is one fp32 add."""
    k = a.shape[-1]
    pad = (-k) % LANES
    prod = a * b
    if pad:
        prod = torch.nn.functional.pad(prod, (0, pad))
    prod = prod.reshape(*prod.shape[:-1], -1, LANES)
    acc = torch.zeros(prod.shape[:-2] + (LANES,), dtype=torch.float32)
    for s in range(prod.shape[-2]):
        acc = acc + prod[..., s, :]
    return hsum8(acc)


def _f16_vec_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`ggml_vec_dot_f16` (AVX2, F16C) over the last dim, used when one query row is multiplied (decode):
    4 accumulators of 8 fp32 lanes over steps of 32 elements (element i: accumulator (i // 8) % 4,
    lane i % 8), reduced as `GGML_F32x8_REDUCE`. The last dim must be a multiple of 32 after padding."""
    k = a.shape[-1]
    prod = a * b
    pad = (-k) % (4 * LANES)
    if pad:
        prod = torch.nn.functional.pad(prod, (0, pad))
    prod = prod.reshape(*prod.shape[:-1], -1, 4, LANES)
    acc = torch.zeros(prod.shape[:-3] + (4, LANES), dtype=torch.float32)
    for s in range(prod.shape[-3]):
        acc = acc + prod[..., s, :, :]
    x0 = acc[..., 0, :] + acc[..., 2, :]
    x1 = acc[..., 1, :] + acc[..., 3, :]
    x0 = x0 + x1
    t0 = x0[..., :4] + x0[..., 4:]
    return (t0[..., 0] + t0[..., 1]) + (t0[..., 2] + t0[..., 3])


def ggml_softmax(scores: torch.Tensor) -> torch.Tensor:
    """`soft_max_ext` rows (already scaled and masked, fp32): ggml expf, per-8 fp32 sums added in double,
    then `x * (float)(1.0 / sum)`."""
    mx = scores.amax(-1, keepdim=True)
    e = ggml_expf(scores - mx)
    e = torch.where(torch.isneginf(scores), torch.zeros_like(e), e)
    k = e.shape[-1]
    pad = (-k) % LANES
    ep = torch.nn.functional.pad(e, (0, pad)) if pad else e
    chunks = hsum8(ep.reshape(*ep.shape[:-1], -1, LANES))
    total = chunks.double().sum(-1, keepdim=True)
    return e * (torch.ones_like(total) / total).float()


def ggml_attention(q: torch.Tensor, k16: torch.Tensor, v16: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention as llama.cpp without flash attention on an F16 KV cache.

    `q [B, H, T, D]` fp32 (the last T of S positions), `k16`/`v16` `[B, KV, S, D]` holding fp16 values.
    KQ = fp16(q) . k (tinyBLAS), softmax(scale * KQ + mask), KQV = fp16(p) . v (tinyBLAS)."""
    b, h, t, d = q.shape
    kv, s = k16.shape[1], k16.shape[2]
    groups = h // kv
    # llama.cpp keeps GGUF's pair-interleaved Q/K rows: its dot runs over dims in the order
    # (0, d/2, 1, d/2+1, ...) of our rotate-half layout, and the lanes follow that order
    order = torch.arange(d).view(2, d // 2).t().reshape(-1)
    qh = fp16_round(q)[..., order].reshape(b, kv, groups, t, 1, d)
    kk = k16.float()[..., order].reshape(b, kv, 1, 1, s, d)
    # one query row (decode) runs ggml's vec_dot_f16; several rows run llamafile's tinyBLAS
    dot = _f16_vec_dot if t == 1 else _f16_dot_lanes
    scores = dot(qh, kk) * scale                                   # [B, KV, G, T, S]
    allowed = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p16 = fp16_round(ggml_softmax(scores))                         # [B, KV, G, T, S]
    vt = v16.float().transpose(-1, -2).reshape(b, kv, 1, 1, d, s)  # V^T rows: one per output dim
    out = dot(p16.unsqueeze(-2), vt)                               # [B, KV, G, T, D]
    return out.reshape(b, h, t, d)
