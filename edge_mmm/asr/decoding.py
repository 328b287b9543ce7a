"""Decoding one 30 s window: prompt, logit filters, greedy/sampling and beam search, as openai-whisper does.

Works on numpy logits from any backend (`edge_mmm.asr.backends`), so torch and onnxruntime share it.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_mmm.asr.tokenizer import WhisperTokenizer
from edge_mmm.audio.constants import CHUNK_LENGTH
from edge_mmm.errors import InputError


@dataclass
class DecodingOptions:
    task: str = "transcribe"
    language: Optional[str] = None  # None: detect (multilingual models) / "en" (.en models)
    temperature: float = 0.0
    beam_size: int = 1  # 1 = greedy (or sampling when temperature > 0)
    best_of: int = 1  # independent samples when temperature > 0
    patience: float = 1.0
    length_penalty: Optional[float] = None
    timestamps: bool = True
    suppress_blank: bool = True
    suppress_tokens: str = "-1"  # comma-separated ids; -1 = the non-speech symbol set
    max_initial_timestamp: float = 1.0
    sample_len: Optional[int] = None  # max new tokens; default n_text_ctx // 2
    seed: int = 0


@dataclass
class DecodingResult:
    tokens: List[int]  # sampled text + timestamp tokens (no prompt, no <|endoftext|>)
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = x - m
    return e - np.log(np.exp(e).sum(axis=-1, keepdims=True))


class LogitFilter(abc.ABC):
    @abc.abstractmethod
    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """Mask `logits` [B, V] in place given the tokens so far [B, T]."""


@dataclass
class SuppressBlank(LogitFilter):
    blank_ids: Tuple[int, ...]
    sample_begin: int

    def apply(self, logits, tokens):
        if tokens.shape[1] == self.sample_begin:
            logits[:, list(self.blank_ids)] = -np.inf


@dataclass
class SuppressTokens(LogitFilter):
    ids: Tuple[int, ...]

    def apply(self, logits, tokens):
        logits[:, list(self.ids)] = -np.inf


@dataclass
class ApplyTimestampRules(LogitFilter):
    tokenizer: WhisperTokenizer
    sample_begin: int
    max_initial_timestamp_index: Optional[int]

    def apply(self, logits, tokens):
        tb, eot = self.tokenizer.timestamp_begin, self.tokenizer.eot
        logits[:, self.tokenizer.no_timestamps] = -np.inf
        for k in range(tokens.shape[0]):
            seq = tokens[k, self.sample_begin :]
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penultimate_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penultimate_ts:  # a pair just closed: text must follow
                    logits[k, tb:] = -np.inf
                else:  # an open timestamp: the next one closes it (or the text ends)
                    logits[k, :eot] = -np.inf
            stamps = seq[seq >= tb]
            if stamps.size > 0:
                # timestamps never decrease, and every segment has a non-zero length
                last = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
                logits[k, tb:last] = -np.inf
        if tokens.shape[1] == self.sample_begin:
            logits[:, :tb] = -np.inf
            if self.max_initial_timestamp_index is not None:
                logits[:, tb + self.max_initial_timestamp_index + 1 :] = -np.inf
        logprobs = log_softmax(logits.astype(np.float32))
        for k in range(tokens.shape[0]):
            ts_lp = logprobs[k, tb:]
            finite = ts_lp[np.isfinite(ts_lp)]
            ts_logprob = np.logaddexp.reduce(finite) if finite.size else -np.inf
            if ts_logprob > logprobs[k, :tb].max():
                logits[k, :tb] = -np.inf


def build_filters(tok: WhisperTokenizer, opts: DecodingOptions, sample_begin: int) -> List[LogitFilter]:
    filters: List[LogitFilter] = []
    if opts.suppress_blank:
        filters.append(SuppressBlank(tuple(tok.encode(" ")) + (tok.eot,), sample_begin))
    ids = _suppress_ids(tok, opts.suppress_tokens)
    if ids:
        filters.append(SuppressTokens(ids))
    if opts.timestamps:
        precision = CHUNK_LENGTH / 1500
        idx = None if opts.max_initial_timestamp is None else round(opts.max_initial_timestamp / precision)
        filters.append(ApplyTimestampRules(tok, sample_begin, idx))
    return filters


def _suppress_ids(tok: WhisperTokenizer, spec: str) -> Tuple[int, ...]:
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()] if spec else []
    except ValueError:
        raise InputError(f"suppress_tokens must be comma-separated integers, got {spec!r}") from None
    if -1 in ids:
        ids = [i for i in ids if i >= 0] + list(tok.non_speech_tokens)
    ids += [tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech]
    return tuple(sorted(set(ids)))


def detect_language(backend, tok: WhisperTokenizer, audio) -> Tuple[str, Dict[str, float]]:
    """Most likely language of a window and the probabilities of all languages."""
    if not tok.multilingual:
        return "en", {"en": 1.0}
    state = backend.new_state(audio, 1)
    logits = backend.step(state, np.array([[tok.sot]], dtype=np.int64))[:, 0]
    codes = list(tok.language_ids)
    lang_logits = logits[0, [tok.language_ids[c] for c in codes]]
    probs = np.exp(log_softmax(lang_logits[None])[0])
    return codes[int(probs.argmax())], dict(zip(codes, probs.tolist()))


def decode_window(backend, tok: WhisperTokenizer, audio, opts: DecodingOptions,
                  prompt: Sequence[int] = (), draft: Sequence[int] = ()) -> DecodingResult:
    """Decode one window whose encoder output is `audio` (from `backend.encode`).

    `draft`: tokens this window probably decodes to (an earlier pass over a prefix of the same audio, as the
    live recognizer has). Greedy decoding at temperature 0 then checks them all in the first decoder call and
    keeps the longest prefix that greedy decoding picks itself (speculative decoding with the last hypothesis
    as the draft model): the same tokens as without a draft, up to float rounding of the batched call, in
    one call for the agreed part instead of one per token. Ignored by sampling and beam search."""
    language = opts.language
    if language is None:
        language = detect_language(backend, tok, audio)[0] if tok.multilingual else "en"
    initial: List[int] = []
    n_ctx = backend.config.n_text_ctx
    if prompt:
        initial = [tok.sot_prev] + list(prompt)[-(n_ctx // 2 - 1) :]
    sot_index = len(initial)
    initial += list(tok.sot_sequence(language, opts.task))
    if not opts.timestamps:
        initial.append(tok.no_timestamps)
    sample_begin = len(initial)
    sample_len = opts.sample_len or n_ctx // 2
    if sample_begin + sample_len > n_ctx:
        sample_len = n_ctx - sample_begin
    filters = build_filters(tok, opts, sample_begin)
    if opts.beam_size > 1:
        if opts.temperature > 0:
            raise InputError("beam search cannot be combined with temperature > 0")
        search = BeamSearch(opts.beam_size, tok.eot, opts.patience)
        group = opts.beam_size
    else:
        search = Greedy(opts.temperature, tok.eot, np.random.default_rng(opts.seed))
        group = opts.best_of if opts.temperature > 0 else 1
    state = backend.new_state(audio, group)
    tokens = np.tile(np.array(initial, dtype=np.int64), (group, 1))
    draft = [int(t) for t in draft][: max(0, min(sample_len, n_ctx - sample_begin) - 1)]
    bad = [i for i, t in enumerate(draft) if not 0 <= t < backend.config.n_vocab]
    draft = draft[: bad[0]] if bad else draft  # a draft is a guess: an impossible id only ends it
    if group > 1 or opts.temperature > 0:
        draft = []
    sum_logprobs = np.zeros(group, dtype=np.float64)
    no_speech_prob = float("nan")
    new = np.concatenate([tokens, np.array([draft], dtype=np.int64).reshape(group, -1)], axis=1)
    rows = None  # logits of positions already computed whose prefix is still the decoded one
    for i in range(sample_len):
        if rows is None:
            first = state.offset  # position of new[:, 0]
            rows = backend.step(state, new)
            if i == 0:
                ns = log_softmax(rows[:, sot_index].astype(np.float32))
                no_speech_prob = float(np.exp(ns[0, tok.no_speech]))
            rows = rows[:, tokens.shape[1] - 1 - first :]  # from the prediction of the next token on
        logits = np.array(rows[:, 0], dtype=np.float32)
        rows = rows[:, 1:]
        for f in filters:
            f.apply(logits, tokens)
        tokens, completed, order = search.update(tokens, logits, sum_logprobs)
        if order is not None:
            backend.reorder(state, order)
        if rows.shape[1] == 0 or tokens[0, -1] != draft[i]:
            # the draft ends here or greedy decoding left it: drop its cached positions past the agreed part
            if state.offset > tokens.shape[1] - 1:
                backend.truncate(state, tokens.shape[1] - 1)
            rows = None
        new = tokens[:, -1:]
        if completed or tokens.shape[1] >= n_ctx:
            break
    candidates = search.finalize(tokens, sum_logprobs)
    best = _rank(candidates, sample_begin, tok.eot, opts.length_penalty)
    seq, logprob = best
    sampled = [t for t in seq[sample_begin:]]
    if tok.eot in sampled:
        sampled = sampled[: sampled.index(tok.eot)]
    return DecodingResult(
        tokens=sampled, text=tok.decode(sampled), language=language,
        avg_logprob=logprob / (len(sampled) + 1), no_speech_prob=no_speech_prob, temperature=opts.temperature)


def _rank(candidates: List[Tuple[Tuple[int, ...], float]], sample_begin: int, eot: int,
          length_penalty: Optional[float]) -> Tuple[Tuple[int, ...], float]:
    def score(item):
        seq, logprob = item
        body = seq[sample_begin:]
        length = body.index(eot) if eot in body else len(body)
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        return logprob / max(penalty, 1e-9)

    return max(candidates, key=score)


class Greedy:
    """Argmax at temperature 0, else sampling from softmax(logits / T); finished rows keep emitting EOT."""

    def __init__(self, temperature: float, eot: int, rng: np.random.Generator):
        self.temperature, self.eot, self.rng = temperature, eot, rng

    def update(self, tokens, logits, sum_logprobs):
        if self.temperature == 0:
            next_tokens = logits.argmax(axis=-1)
        else:
            probs = np.exp(log_softmax(logits / self.temperature).astype(np.float64))
            next_tokens = np.array([self.rng.choice(len(p), p=p / p.sum()) for p in probs])
        logprobs = log_softmax(logits)
        done = tokens[:, -1] == self.eot
        current = logprobs[np.arange(len(next_tokens)), next_tokens]
        sum_logprobs += np.where(done, 0.0, current)
        next_tokens = np.where(done, self.eot, next_tokens)
        tokens = np.concatenate([tokens, next_tokens[:, None].astype(np.int64)], axis=1)
        return tokens, bool((tokens[:, -1] == self.eot).all()), None

    def finalize(self, tokens, sum_logprobs):
        return [(tuple(int(t) for t in row) + (self.eot,), float(lp)) for row, lp in zip(tokens, sum_logprobs)]


class BeamSearch:
    """openai-whisper's beam search for one audio: beam_size live beams, patience * beam_size finished."""

    def __init__(self, beam_size: int, eot: int, patience: float = 1.0):
        self.beam_size, self.eot = beam_size, eot
        self.max_candidates = round(beam_size * patience)
        if self.max_candidates <= 0:
            raise InputError(f"patience {patience} leaves no beam candidates")
        self.finished: Dict[Tuple[int, ...], float] = {}

    def update(self, tokens, logits, sum_logprobs):
        logprobs = log_softmax(logits)
        scores: Dict[Tuple[int, ...], float] = {}
        sources: Dict[Tuple[int, ...], int] = {}
        for j in range(tokens.shape[0]):
            prefix = tuple(int(t) for t in tokens[j])
            top = np.argsort(-logprobs[j], kind="stable")[: self.beam_size + 1]
            for tkn in top:
                seq = prefix + (int(tkn),)
                scores[seq] = float(sum_logprobs[j] + logprobs[j, tkn])
                sources[seq] = j
        next_tokens, order, new_sums, newly = [], [], [], {}
        for seq in sorted(scores, key=scores.get, reverse=True):
            if seq[-1] == self.eot:
                newly[seq] = scores[seq]
            else:
                new_sums.append(scores[seq])
                next_tokens.append(seq)
                order.append(sources[seq])
                if len(next_tokens) == self.beam_size:
                    break
        sum_logprobs[: len(new_sums)] = new_sums
        for seq in sorted(newly, key=newly.get, reverse=True):
            if len(self.finished) >= self.max_candidates:
                break
            self.finished[seq] = newly[seq]
        completed = len(self.finished) >= self.max_candidates
        return np.array(next_tokens, dtype=np.int64), completed, np.array(order, dtype=np.int64)

    def finalize(self, tokens, sum_logprobs):
        finished = dict(self.finished)
        if len(finished) < self.beam_size:
            for j in np.argsort(-sum_logprobs, kind="stable"):
                finished[tuple(int(t) for t in tokens[j]) + (self.eot,)] = float(sum_logprobs[j])
                if len(finished) >= self.beam_size:
                    break
        return list(finished.items())
