"""The online-softmax step shared by the attention kernels (`flash_attention`, `decode_attention`).

One call folds a block of keys/values into the running state of a block of query rows:
    s = (q k^T) * qk_scale (base-2 logits), hidden where `allowed` is False,
    m' = max(m, rowmax s), p = 2^(s - m'), l' = l 2^(m - m') + rowsum p, acc' = acc 2^(m - m') + p v.
A row that has seen no visible key keeps m = -inf, l = 0, acc = 0 (its `m_safe` is 0, so no NaN appears).
`IEEE` (constexpr) runs both dots in float32 ("ieee" precision: float32 inputs, and bf16 under the
interpreter, see `dispatch.fp32_dot`); otherwise the tiles go to the tensor cores in their own dtype.
"""

from __future__ import annotations

from edge_mmm.kernels.dispatch import jit

tl = None  # triton.language, bound by dispatch.jit on first launch


@jit
def attend_block(q, k, v, allowed, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    if IEEE:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(allowed, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc
