"""Whisper's text decoder on edge-mmm's C kernel (`edge_whisper_step` in cpu_lm.c). Torch-free.

The weights come from a pack beside the onnxruntime graphs (exporters/whisper_decoder_pack.py writes it from the
float model; the file pair of `runners.array_pack`): `DECODER_PACK_JSON` holds the sizes and indexes the arrays
in `DECODER_PACK_BIN`. Weight matrices and the tied token table are stored as the checkpoint holds them, fp16
where every value is one (the openai-whisper and CTranslate2 files), else fp32; the kernel converts fp16 in
registers and computes in fp32, so the logits are the float model's to fp32 rounding.

`CpuWhisperDecoder.step(tokens, offset, self_k, self_v, cross_k, cross_v)` runs B sequences of T new tokens,
writes their keys and values into the caller's cache `[layers, B, max_len, dim]` at offset .. offset+T-1 and
returns the logits `[B, T, vocab]` of every new position. Calls from several threads run one at a time (the
kernel's one thread team, cpu_lm.c `team_run`).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from edge_mmm.runners.array_pack import read_array_pack
from edge_mmm.runners.cpu_lm import default_threads

DECODER_PACK_JSON = "decoder_pack.json"
DECODER_PACK_BIN = "decoder_pack.bin"
PACK_FORMAT = 2  # 2: the shared array-pack index (runners.array_pack)
LAYER_MATRICES = ("qkv", "out", "cross_q", "cross_out", "fc1", "fc2")
LAYER_NORMS = ("attn_ln", "cross_ln", "mlp_ln")
SIZES = ("dim", "layers", "heads", "inter", "vocab", "n_ctx")


class _FMat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("f16", ctypes.c_int64), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class _WLayer(ctypes.Structure):
    _fields_ = [("attn_ln_w", ctypes.c_void_p), ("attn_ln_b", ctypes.c_void_p), ("qkv", _FMat), ("out", _FMat),
                ("cross_ln_w", ctypes.c_void_p), ("cross_ln_b", ctypes.c_void_p), ("cross_q", _FMat),
                ("cross_out", _FMat), ("mlp_ln_w", ctypes.c_void_p), ("mlp_ln_b", ctypes.c_void_p),
                ("fc1", _FMat), ("fc2", _FMat)]


class _WModel(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in SIZES + ("table_f16",)] + [
        ("eps", ctypes.c_float), ("table", ctypes.c_void_p), ("pos", ctypes.c_void_p), ("ln_w", ctypes.c_void_p),
        ("ln_b", ctypes.c_void_p), ("layer", ctypes.POINTER(_WLayer))]


def expected_arrays(sizes: Dict[str, int]) -> Dict[str, tuple]:
    """name -> (allowed dtypes, shape) of every array a pack of these sizes holds."""
    d, i, v = sizes["dim"], sizes["inter"], sizes["vocab"]
    weights, floats = ("<f2", "<f4"), ("<f4",)
    out = {"table": (weights, (v, d)), "pos": (floats, (sizes["n_ctx"], d)),
           "ln.w": (floats, (d,)), "ln.b": (floats, (d,))}
    shapes = {"qkv": (3 * d, d), "out": (d, d), "cross_q": (d, d), "cross_out": (d, d), "fc1": (i, d), "fc2": (d, i)}
    for layer in range(sizes["layers"]):
        for name, shape in shapes.items():
            out[f"blocks.{layer}.{name}.w"] = (weights, shape)
            out[f"blocks.{layer}.{name}.b"] = (floats, (shape[0],))
        for name in LAYER_NORMS:
            out[f"blocks.{layer}.{name}.w"] = (floats, (d,))
            out[f"blocks.{layer}.{name}.b"] = (floats, (d,))
    return out


def read_decoder_pack(directory: Path) -> Optional[tuple]:
    """(sizes and eps, name -> array) of the pack in `directory` (`runners.array_pack`), or None when it holds
    none; ValueError naming the file when the pack is malformed or not what the kernel reads (the C code trusts
    these shapes: a pack from an untrusted bundle must not make it read out of bounds)."""
    meta_path = Path(directory) / DECODER_PACK_JSON
    if not meta_path.is_file():
        return None
    meta, arrays = read_array_pack(meta_path, Path(directory) / DECODER_PACK_BIN)
    if meta.get("format") != PACK_FORMAT:
        raise ValueError(f"{meta_path}: not a Whisper decoder pack of format {PACK_FORMAT}")
    sizes = {k: meta.get(k) for k in SIZES}
    if not all(isinstance(v, int) and 0 < v <= 1 << 20 for v in sizes.values()) or sizes["dim"] % sizes["heads"]:
        raise ValueError(f"{meta_path}: bad sizes {sizes}")
    if not isinstance(meta.get("eps"), float) or not 0 < meta["eps"] < 1:
        raise ValueError(f"{meta_path}: bad eps {meta.get('eps')!r}")
    expected = expected_arrays(sizes)
    if set(arrays) != set(expected):
        raise ValueError(f"{meta_path}: the arrays listed are not those of a {sizes['layers']}-layer decoder")
    for name, (dtypes, shape) in expected.items():
        a = arrays[name]
        if a.dtype.str not in dtypes or a.shape != shape:
            raise ValueError(f"{meta_path}: array {name} is {a.dtype.str} {a.shape}, expected {dtypes} {shape}")
    return {**sizes, "eps": meta["eps"]}, arrays


class CpuWhisperDecoder:
    """Whisper's decoder on the C kernel (`lib`: runners.cpu_lm.host_library) over a pack's arrays."""

    def __init__(self, lib: ctypes.CDLL, sizes: dict, arrays: Dict[str, np.ndarray], threads: int = 0):

        self.lib, self.sizes, self._arrays = lib, sizes, arrays  # the arrays stay referenced: the C side reads them
        self.threads = int(threads) if threads and threads > 0 else default_threads()

        def ptr(name: str) -> int:
            return arrays[name].ctypes.data

        def fmat(prefix: str) -> _FMat:
            w = arrays[prefix + ".w"]
            return _FMat(w.ctypes.data, int(w.dtype == np.float16), ptr(prefix + ".b"), w.shape[0], w.shape[1])

        layers = []
        for i in range(sizes["layers"]):
            p = f"blocks.{i}."
            norms = {f"{n}_{wb}": ptr(f"{p}{n}.{wb}") for n in LAYER_NORMS for wb in ("w", "b")}
            layers.append(_WLayer(**norms, **{m: fmat(p + m) for m in LAYER_MATRICES}))
        self._layers = (_WLayer * len(layers))(*layers)
        table = arrays["table"]
        self._model = _WModel(**{k: sizes[k] for k in SIZES}, table_f16=int(table.dtype == np.float16),
                              eps=sizes["eps"], table=table.ctypes.data, pos=ptr("pos"), ln_w=ptr("ln.w"),
                              ln_b=ptr("ln.b"), layer=self._layers)

    @property
    def max_len(self) -> int:
        return self.sizes["n_ctx"]

    def empty_cache(self, batch: int) -> np.ndarray:
        """A self-attention cache [layers, batch, n_ctx, dim] (no position is valid yet; fill it with `step`)."""
        return np.empty((self.sizes["layers"], batch, self.sizes["n_ctx"], self.sizes["dim"]), np.float32)

    def step(self, tokens: np.ndarray, offset: int, self_k: np.ndarray, self_v: np.ndarray,
             cross_k: Sequence[np.ndarray], cross_v: Sequence[np.ndarray]) -> np.ndarray:
        """tokens [B, T] at positions offset .. offset+T-1 -> logits [B, T, vocab] float32; ValueError on bad
        shapes, positions past the context or token ids outside the vocabulary."""
        s = self.sizes
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.size == 0:
            raise ValueError(f"tokens must be [batch, new] and not empty, got {tokens.shape}")
        b, t = tokens.shape
        cache_shape = (s["layers"], b, s["n_ctx"], s["dim"])
        for name, cache in (("self_k", self_k), ("self_v", self_v)):
            if cache.shape != cache_shape or cache.dtype != np.float32 or not cache.flags.c_contiguous \
                    or not cache.flags.writeable:
                raise ValueError(f"{name} must be a writable C-contiguous float32 {cache_shape}, got "
                                 f"{cache.dtype} {cache.shape}")
        if len(cross_k) != s["layers"] or len(cross_v) != s["layers"]:
            raise ValueError(f"cross_k / cross_v must hold {s['layers']} arrays")
        heads, head_dim = s["heads"], s["dim"] // s["heads"]
        audio = cross_k[0].shape[-1]
        ks: List[np.ndarray] = []
        vs: List[np.ndarray] = []
        for k, v in zip(cross_k, cross_v):
            if k.shape != (b, heads, head_dim, audio) or v.shape != (b, heads, audio, head_dim):
                raise ValueError(f"cross K^T must be {(b, heads, head_dim, audio)} and V {(b, heads, audio, head_dim)}, "
                                 f"got {k.shape} and {v.shape}")
            ks.append(np.ascontiguousarray(k, dtype=np.float32))
            vs.append(np.ascontiguousarray(v, dtype=np.float32))
        logits = np.empty((b, t, s["vocab"]), np.float32)
        k_ptrs = (ctypes.c_void_p * len(ks))(*[a.ctypes.data for a in ks])
        v_ptrs = (ctypes.c_void_p * len(vs))(*[a.ctypes.data for a in vs])
        rc = self.lib.edge_whisper_step(ctypes.byref(self._model), tokens.ctypes.data, b, t, int(offset),
                                        self_k.ctypes.data, self_v.ctypes.data, s["n_ctx"], k_ptrs, v_ptrs, audio,
                                        logits.ctypes.data, self.threads)
        if rc == 2:
            raise MemoryError(f"the C Whisper decoder could not allocate its buffers for {b} x {t} tokens")
        if rc:
            raise ValueError(f"the C Whisper decoder refused {b} x {t} token(s) at position {offset} (context "
                             f"{s['n_ctx']}, ids {tokens.min()}..{tokens.max()} of a {s['vocab']} vocabulary)")
        return logits
