"""How close an LM engine's next-token distributions are to a reference's: top-1 agreement and mean KL.

The engines are compared where generation uses them: teacher-forced decode, one token per call, over
windows of real text (each window starts from an empty KV cache). `decode_logits` runs any backend with
the LMBackend protocol (edge_mmm.text.generation); llama.cpp and other peers feed their own rows into
`agreement`. The reference is usually the float model (the quantized file dequantized exactly to float32),
so the numbers say what each engine's arithmetic (int8 activations, an INT8 head, ...) costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Sequence

import numpy as np

from edge_mmm.errors import InputError


@dataclass(frozen=True)
class Agreement:
    """`top1`: fraction of positions whose argmax equals the reference's; `mean_kl`: mean KL(ref || engine)
    in nats; `positions`: how many positions were compared."""

    top1: float
    mean_kl: float
    positions: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(reference: Iterable[np.ndarray], rows: Iterable[np.ndarray]) -> Agreement:
    """Top-1 agreement and mean KL(reference || rows) over matching [positions, vocab] blocks."""
    same, kl, n = 0, 0.0, 0
    for ref, got in zip(reference, rows, strict=True):
        ref, got = np.atleast_2d(ref), np.atleast_2d(got)
        if ref.shape != got.shape:
            raise InputError(f"logit blocks differ in shape: reference {ref.shape}, engine {got.shape}")
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        lp, lq = log_softmax(ref), log_softmax(got)
        kl += float((np.exp(lp) * (lp - lq)).sum())
        n += ref.shape[0]
    if n == 0:
        raise InputError("no positions to compare")
    return Agreement(same / n, kl / n, n)


def text_windows(ids: Sequence[int], positions: int, window: int) -> List[List[int]]:
    """The first `positions` ids cut into windows of `window` (the last one may be shorter)."""
    if window < 2:
        raise InputError(f"window must be >= 2 tokens, got {window}")
    if len(ids) < positions:
        raise InputError(f"the text has {len(ids)} tokens, fewer than the {positions} positions asked for")
    ids = list(ids[:positions])
    return [ids[i:i + window] for i in range(0, len(ids), window)]


def decode_logits(step_first: Callable[[int], np.ndarray], step_next: Callable[[int], np.ndarray],
                  window: Sequence[int]) -> np.ndarray:
    """[len(window), vocab] logits after each token of `window`, one token per call: `step_first(id)` starts
    a fresh cache with the first token, `step_next(id)` appends one."""
    rows = [np.asarray(step_first(int(window[0])), dtype=np.float32)]
    rows += [np.asarray(step_next(int(t)), dtype=np.float32) for t in window[1:]]
    return np.stack(rows)


def backend_decode_logits(backend, windows: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """`decode_logits` of an LMBackend (new_cache / prefill / decode) for every window."""
    out = []
    for window in windows:
        state = {}

        def first(tok):
            state["cache"] = backend.new_cache()
            return _numpy(backend.prefill([tok], state["cache"]))

        out.append(decode_logits(first, lambda tok: _numpy(backend.decode(tok, state["cache"])), window))
    return out


def _numpy(logits) -> np.ndarray:
    return logits.numpy() if hasattr(logits, "numpy") else np.asarray(logits)
