"""Token generation: options and result dataclasses, the backend interface, sampling, streaming.

A backend only provides `new_cache()`, `prefill(ids, cache) -> logits` and `decode(id, cache) -> logits`
(logits of the last position, 1-D float). `TorchBackend` wraps the `Llama` module; other backends
(onnxruntime) implement the same three methods with a cache that has `length` and `truncate(n)`.

Context policy: a prompt that does not fit the context (prompt tokens >= context length) is an
`InputError` stating both lengths; nothing is truncated silently. Generation stops with
`finish_reason="length"` when `max_tokens` are produced or the context is full, and, with `stop_loops` (the
live assistant), `finish_reason="loop"` once the answer has fallen into a loop (`in_loop`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from edge_mmm.errors import ContextOverflowError, InputError
from edge_mmm.text.backends import TorchBackend  # noqa: F401  (its old home; tests import it from here)


SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # 64 bits, signed or unsigned (a negative seed is taken mod 2**64)
LOOP_MAX_PERIOD = 64  # tokens in the repeated block, at most
LOOP_MIN_TOKENS = 24  # tokens the repetition spans, at least (and 3 copies of the block)
# Logits: 1-D float32, a numpy array (onnxruntime backends, the CPU kernel) or a torch tensor (torch backend).
# Greedy decoding needs neither torch nor a copy; sampling runs in numpy (float64) with a seeded numpy generator.


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()  # added to the model's own end-of-turn tokens
    stop_strings: Tuple[str, ...] = ()
    stop_loops: bool = False  # end a degenerate answer that repeats one block of tokens (see `in_loop`)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise InputError(f"seed must be in [{SEED_MIN}, {SEED_MAX}] (64 bits), got a {len(str(self.seed))}-digit "
                             f"number")
        if not 0 <= self.top_p <= 1:  # 0 keeps only the most likely token (as transformers and llama.cpp do)
            raise InputError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    text: str
    token_ids: List[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "loop"
    timings: Dict[str, float] = field(default_factory=dict)  # load_s, prefill_tok_s, decode_tok_s, ttft_s

    def to_dict(self) -> dict:
        return asdict(self)


class LMCache(Protocol):
    length: int

    def truncate(self, n: int) -> None: ...


class LMBackend(Protocol):
    context_length: int

    def new_cache(self) -> LMCache: ...

    def prefill(self, ids: Sequence[int], cache: LMCache) -> Any: ...  # 1-D logits (numpy or torch)

    def decode(self, token_id: int, cache: LMCache) -> Any: ...


def sampler(seed: Optional[int]) -> np.random.Generator:
    """The random source of one generation: seeded (the same seed, the same tokens) or fresh."""
    return np.random.default_rng(None if seed is None else seed % 2 ** 64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sample(logits, config: GenerationConfig, rng: Optional[np.random.Generator]) -> int:
    """Greedy when temperature is 0 (the first index of the maximum, numpy or torch alike); else
    temperature -> top-k -> top-p (the smallest set of most likely tokens whose probability reaches top_p; at
    least one) -> one draw from `rng` (`sampler`), in float64 numpy."""
    if config.temperature == 0:
        return int(logits.argmax())
    if not isinstance(logits, np.ndarray):  # a torch tensor, maybe on a GPU
        logits = logits.detach().float().cpu().numpy()
    x = logits.astype(np.float64) / config.temperature
    if 0 < config.top_k < x.size:
        kth = np.partition(x, x.size - config.top_k)[x.size - config.top_k]
        x[x < kth] = -np.inf
    probs = _softmax(x)
    tokens = _nucleus(probs, config.top_p) if config.top_p < 1.0 else None
    if tokens is not None:
        probs = probs[tokens]
    cdf = np.cumsum(probs)
    i = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))
    return int(tokens[i]) if tokens is not None else i


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The most likely tokens, in order, while the probability before each is at most `top_p` (at least one).
    Sorts only a candidate set (256, then 8x more) that holds more than `top_p` of the mass: a full sort of a
    49k vocabulary cost ~3.5 ms a token, as long as a decode step."""
    m, top = 256, None
    while m < probs.size:
        top = np.argpartition(-probs, m - 1)[:m]
        if probs[top].sum() > top_p:  # every token outside the set is dropped
            break
        m, top = m * 8, None
    if top is None:
        top = np.arange(probs.size)
    top = top[np.argsort(-probs[top], kind="stable")]
    before = np.cumsum(probs[top]) - probs[top]
    return top[before <= top_p]


class TokenStream:
    """Iterate to get text deltas as tokens are produced; afterwards `result` holds the `Generation`."""

    def __init__(self, backend: LMBackend, tokenizer, prompt_ids: List[int], config: GenerationConfig,
                 cache: LMCache, reuse: int = 0, load_s: float = 0.0):
        self.result: Optional[Generation] = None
        self.token_ids: List[int] = []  # grows live; `cache` holds (prompt_ids + token_ids)[:cache.length]
        self._it = self._run(backend, tokenizer, prompt_ids, config, cache, reuse, load_s)

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def consume(self) -> Generation:
        for _ in self._it:
            pass
        return self.result

    def _run(self, backend, tokenizer, prompt_ids, config, cache, reuse, load_s) -> Iterator[str]:
        from edge_mmm.text.tokenizer import IncrementalDecoder

        t0 = time.perf_counter()
        check_prompt(len(prompt_ids), backend.context_length)
        config.validate()
        stops = set(tokenizer.stop_token_ids) | set(config.stop_token_ids)
        generator = sampler(config.seed) if config.temperature > 0 else None
        # reuse the cached prefix; at least the last prompt token is always recomputed for its logits
        reuse = min(reuse, len(prompt_ids) - 1)
        cache.truncate(reuse)
        t_p0 = time.perf_counter()
        logits = backend.prefill(prompt_ids[reuse:], cache)
        t_p1 = time.perf_counter()
        t_prefill = t_p1 - t0
        decoder = IncrementalDecoder(tokenizer)
        ids = self.token_ids
        text, emitted, finish = "", 0, "length"
        t_first = t_decode0 = None
        while True:
            tok = sample(logits, config, generator)
            if t_first is None:
                t_first = t_decode0 = time.perf_counter()
            if tok in stops:
                finish = "stop"
                break
            ids.append(tok)
            text += decoder.push(tok)
            cut = _find_stop(text, config.stop_strings)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            safe = len(text) - _stop_prefix_len(text, config.stop_strings)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if len(ids) >= config.max_tokens or cache.length >= backend.context_length:
                break
            if config.stop_loops and in_loop(ids):
                finish = "loop"
                break
            logits = backend.decode(tok, cache)
        if finish in ("length", "loop"):
            text += decoder.flush()
        if len(text) > emitted:
            yield text[emitted:]
        t_end = time.perf_counter()
        n_dec = len(ids) - 1  # the first token comes from the prefill logits
        self.result = Generation(
            text=text, token_ids=ids, prompt_tokens=len(prompt_ids), finish_reason=finish,
            timings={"load_s": load_s, "prefill_s": t_p1 - t_p0,
                     "prefill_tok_s": (len(prompt_ids) - reuse) / t_prefill if t_prefill > 0 else 0.0,
                     "decode_tok_s": n_dec / (t_end - t_decode0) if n_dec > 0 and t_end > t_decode0 else 0.0,
                     "ttft_s": t_first - t0, "prompt_reused": float(reuse)})


def in_loop(ids: Sequence[int]) -> bool:
    """True when `ids` end in one block of at most LOOP_MAX_PERIOD tokens repeated back to back, at least 3
    times and over at least LOOP_MIN_TOKENS tokens ("le Grand Croix de la femme de France, " again and again):
    a small greedy model that starts this never leaves it (a 135M model answers a misheard question with 128
    tokens of one French clause). Ordinary text repeats words and phrases, not 24 tokens in lockstep."""
    ids = list(ids[-3 * LOOP_MAX_PERIOD:])  # the longest span looked at
    n = len(ids)
    for period in range(1, min(LOOP_MAX_PERIOD, n // 3) + 1):
        span = max(3 * period, LOOP_MIN_TOKENS)
        if span <= n and ids[n - span + period:] == ids[n - span:n - period]:
            return True
    return False


def cached_ids(prompt_ids: Sequence[int], last: Optional["TokenStream"], cache_length: int) -> List[int]:
    """The token ids a KV cache holds after `last` streamed from `prompt_ids`: (prompt + generated)[:length],
    however far the stream was consumed."""
    seen = list(prompt_ids) + (last.token_ids if last is not None else [])
    return seen[:cache_length]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items `a` and `b` share (the KV positions a new prompt can reuse)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_prompt(n_prompt: int, context_length: int) -> None:
    if n_prompt == 0:
        raise InputError("the prompt is empty")
    if n_prompt >= context_length:
        raise ContextOverflowError(n_prompt, context_length)


def _find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could start a stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
