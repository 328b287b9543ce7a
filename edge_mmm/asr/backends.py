"""Whisper inference backends: `torch` (reference, eager), `onnxruntime` (default on CPU) and `tensorrt`.

All expose the same small interface used by `edge_mmm.asr.decoding`:
    device: the torch device the model runs on, where the log-mel front end runs too (`kernels.log_mel`:
        our Triton kernel on CUDA); None for a backend on host numpy arrays (onnxruntime), whose front end
        is numpy (`audio.mel.log_mel_spectrogram_np`)
    encode(mel[B, n_mels, 3000]) -> audio state (cross-attention K/V, computed once per window)
    short_mel: True when encode also takes fewer frames (an utterance plus a margin: whisper.cpp's audio_ctx)
    new_state(audio, group) -> decoder state for `group` parallel hypotheses of that audio
    step(state, tokens[B, T]) -> float32 logits [B, T, n_vocab] (numpy), extending the KV cache
    reorder(state, order) -> keep/duplicate hypotheses (beam search)
    truncate(state, n) -> keep the first n positions of the KV cache (a draft's rejected tail)

torch is imported by the torch and TensorRT backends when they are built, never by this module: the
onnxruntime path (numpy in, numpy out) runs without it and starts ~2 s sooner on a small CPU.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.models.whisper_config import WhisperConfig, cross_names, onnx_files
from edge_mmm.runners.ort_session import ort_session

if TYPE_CHECKING:
    from edge_mmm.models.whisper import Whisper

BACKENDS = ("torch", "onnxruntime")


class PassInterrupted(RuntimeError):
    """A Whisper pass was stopped from another thread (`PassHandle.cancel`); it has no result."""


class PassHandle:
    """Stops the pass it was made for (`ASRModel.interruptible`), from any thread, within one onnxruntime
    kernel; a no-op for a backend that cannot be stopped or a pass that has ended."""

    def __init__(self, run_options=None):
        self.run_options = run_options

    @property
    def supported(self) -> bool:
        return self.run_options is not None

    def cancel(self) -> None:
        if self.run_options is not None:
            self.run_options.terminate = True


@dataclass
class DecoderState:
    cross_k: Any
    cross_v: Any
    self_k: Any
    self_v: Any
    offset: int = 0


class TorchWhisperBackend:
    """The eager model on `device` ("cpu", or "cuda" where our Triton kernels run inside the model)."""

    name = "torch"
    short_mel = True  # the encoder slices its positional embedding to the input

    def __init__(self, model: "Whisper", threads: int = 0, device: str = "cpu"):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.config: WhisperConfig = model.config

    def encode(self, mel: np.ndarray):
        import torch

        with torch.inference_mode():
            mel = torch.as_tensor(mel, dtype=torch.float32, device=self.device)
            return self.model.decoder.cross_kv(self.model.encoder(mel))

    def new_state(self, audio, group: int) -> DecoderState:
        from edge_mmm.models.whisper import repeat_batch

        ck, cv = audio
        if group > 1:
            ck = [repeat_batch(k, group) for k in ck]
            cv = [repeat_batch(v, group) for v in cv]
        sk, sv = self.model.empty_cache(ck[0].shape[0])
        return DecoderState(ck, cv, sk, sv)

    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits, state.self_k, state.self_v = self.model.decoder(
                torch.as_tensor(np.ascontiguousarray(tokens), device=self.device),
                torch.tensor(state.offset, device=self.device),
                state.cross_k, state.cross_v, state.self_k, state.self_v)
        state.offset += tokens.shape[1]
        return logits.cpu().numpy()

    def reorder(self, state: DecoderState, order: np.ndarray) -> None:
        _reorder_torch(state, order, self.device)

    def truncate(self, state: DecoderState, n: int) -> None:
        truncate_cache(state, n)


def truncate_cache(state: DecoderState, n: int) -> None:
    """Keep the first `n` positions of a state's self-attention cache ([L, B, T, D], numpy or torch)."""
    def cut(x):
        x = x[:, :, :n]
        return x.contiguous() if hasattr(x, "contiguous") else np.ascontiguousarray(x)

    state.self_k, state.self_v, state.offset = cut(state.self_k), cut(state.self_v), n


def _reorder_torch(state: DecoderState, order: np.ndarray, device) -> None:
    import torch

    idx = torch.as_tensor(order, device=device)
    state.self_k, state.self_v = state.self_k[:, idx], state.self_v[:, idx]


class OnnxWhisperBackend:
    """Whisper's encoder on onnxruntime; its decoder on edge-mmm's C kernel where the graphs come with a decoder
    pack (`runners.cpu_whisper`: the export cache's fp32 graphs, a CPU bundle's) and the kernel builds on this
    host (`runners.cpu_lm.host_library`), else the decoder graph on onnxruntime (an int8 export, a host
    without the kernel, `cpu_decoder=False`)."""

    name = "onnxruntime"
    device = None  # host numpy arrays in and out: the numpy front end, no torch

    def __init__(self, onnx_dir: Path, config: WhisperConfig, threads: int = 0, cache_dir: Optional[Path] = None,
                 cpu_decoder: bool = True):
        self.config = config
        files = onnx_files(onnx_dir)
        # the decoder runs right after the encoder, the LM right after a pass: idle workers must not spin on
        # the cores those need (2 cores: 15 decoder steps after the encoder 184 -> 132 ms; an LM prefill of 40
        # tokens after a pass 155 -> 121 ms)
        self.encoder = ort_session(files["encoder"], "ONNX Whisper encoder", threads, inputs=["mel"],
                                   spin_after_run=False)
        self.cpu_decoder = _cpu_decoder(Path(onnx_dir), config, threads, cache_dir) if cpu_decoder else None
        self.decoder = None
        if self.cpu_decoder is None:
            self.decoder = ort_session(files["decoder"], "ONNX Whisper decoder", threads,
                                       inputs=["tokens", "offset", "self_k", "self_v"], spin_after_run=False)
        # an export with a named (dynamic) frame axis takes short inputs; an older, fixed one only 3000 frames
        self.short_mel = isinstance(self.encoder.get_inputs()[0].shape[2], str)
        self._pass = threading.local()  # the RunOptions of this thread's interruptible pass, if any

    @contextlib.contextmanager
    def interruptible(self):
        """Runs on this thread inside the block can be stopped by the yielded handle's `cancel()` (from
        another thread: onnxruntime's RunOptions.terminate, checked by the C decoder before each step); a
        stopped run raises PassInterrupted."""
        import onnxruntime as ort

        handle = PassHandle(ort.RunOptions())
        self._pass.run_options = handle.run_options
        try:
            yield handle
        finally:
            self._pass.run_options = None

    def _stopped(self):
        options = getattr(self._pass, "run_options", None)
        if options is not None and options.terminate:
            raise PassInterrupted("the Whisper pass was interrupted")
        return options

    def _run(self, session, feeds):
        options = self._stopped()
        try:
            return session.run(None, feeds, options)
        except Exception:  # onnxruntime's Fail type is not exported
            if options is not None and options.terminate:
                raise PassInterrupted("the Whisper pass was interrupted") from None
            raise

    def encode(self, mel: np.ndarray):
        out = self._run(self.encoder, {"mel": np.ascontiguousarray(mel, dtype=np.float32)})
        n = self.config.n_text_layer
        return out[:n], out[n:]

    def new_state(self, audio, group: int) -> DecoderState:
        ck, cv = audio
        if group > 1:
            ck, cv = [np.repeat(k, group, axis=0) for k in ck], [np.repeat(v, group, axis=0) for v in cv]
        if self.cpu_decoder is not None:  # the whole context, filled as the steps go (`offset` positions valid)
            batch = ck[0].shape[0]
            return DecoderState(ck, cv, self.cpu_decoder.empty_cache(batch), self.cpu_decoder.empty_cache(batch))
        cfg = self.config
        empty = np.zeros((cfg.n_text_layer, ck[0].shape[0], 0, cfg.n_text_state), np.float32)
        return DecoderState(ck, cv, empty, empty.copy())

    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.n_vocab):
            raise InputError(f"Whisper token ids must be in [0, {self.config.n_vocab}), "
                             f"got {tokens.min()}..{tokens.max()}")
        if self.cpu_decoder is not None:
            self._stopped()
            if state.offset + tokens.shape[1] > self.cpu_decoder.max_len:
                raise InputError(f"Whisper's decoder holds {self.cpu_decoder.max_len} positions; "
                                 f"{state.offset} + {tokens.shape[1]} asked")
            logits = self.cpu_decoder.step(tokens, state.offset, state.self_k, state.self_v,
                                           state.cross_k, state.cross_v)
        else:
            feeds = {"tokens": tokens, "offset": np.array(state.offset, np.int64),
                     "self_k": state.self_k, "self_v": state.self_v}
            k_names, v_names = cross_names(self.config.n_text_layer)
            feeds.update(zip(k_names, state.cross_k))
            feeds.update(zip(v_names, state.cross_v))
            logits, state.self_k, state.self_v = self._run(self.decoder, feeds)
        state.offset += tokens.shape[1]
        return logits

    def reorder(self, state: DecoderState, order: np.ndarray) -> None:
        if self.cpu_decoder is None:
            state.self_k, state.self_v = state.self_k[:, order], state.self_v[:, order]
            return
        n = state.offset  # only the filled positions are copied
        for name in ("self_k", "self_v"):
            old = getattr(state, name)
            new = np.empty_like(old)
            new[:, :, :n] = old[:, order, :n]
            setattr(state, name, new)

    def truncate(self, state: DecoderState, n: int) -> None:
        if self.cpu_decoder is None:
            truncate_cache(state, n)
        else:  # positions past `offset` are never read; the next step overwrites them
            state.offset = n


def _cpu_decoder(onnx_dir: Path, config: WhisperConfig, threads: int, cache_dir: Optional[Path]):
    """The C decoder over the pack in `onnx_dir`, or None (no pack there: an int8 export, a GPU bundle's graphs;
    no kernel on this host: `runners.cpu_lm.host_library`)."""
    from edge_mmm.runners.cpu_lm import host_library
    from edge_mmm.runners.cpu_whisper import CpuWhisperDecoder, read_decoder_pack
    from edge_mmm.weights.export_cache import default_cache_root

    try:
        pack = read_decoder_pack(onnx_dir)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"Whisper decoder pack in {onnx_dir}: {exc}") from exc
    if pack is None:
        return None
    sizes, arrays = pack
    want = {"dim": config.n_text_state, "layers": config.n_text_layer, "heads": config.n_text_head,
            "vocab": config.n_vocab, "n_ctx": config.n_text_ctx}
    if any(sizes[k] != v for k, v in want.items()):
        raise ModelFileError(f"{onnx_dir}: the decoder pack's sizes {sizes} disagree with the config {want}")
    lib = host_library(Path(cache_dir) if cache_dir else default_cache_root())
    return None if lib is None else CpuWhisperDecoder(lib, sizes, arrays, threads)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


class TensorRTWhisperBackend:
    """The backend interface on two engines: encoder (mel -> cross K/V of every decoder layer) and decoder
    (tokens + self/cross K/V -> logits + extended self K/V), both built from our standard-op ONNX export
    (exporters/onnx_whisper.py, ort_fused_attention=False). K/V stay on the GPU."""

    name = "tensorrt"
    short_mel = False  # engines are built for the 30 s window

    def __init__(self, encoder_engine: Path, decoder_engine: Path, config: WhisperConfig, device: str = "cuda"):
        import torch

        from edge_mmm.runners.tensorrt_engine import TensorRTEngine

        self.config = config
        self.encoder = TensorRTEngine(encoder_engine, device)
        self.decoder = TensorRTEngine(decoder_engine, device)
        self.device = torch.device(device)

    def encode(self, mel):
        import torch

        out = self.encoder({"mel": torch.as_tensor(mel, dtype=torch.float32)})
        k_names, v_names = cross_names(self.config.n_text_layer)
        return [out[n] for n in k_names], [out[n] for n in v_names]

    def new_state(self, audio, group: int) -> DecoderState:
        import torch

        ck, cv = audio
        if group > 1:
            ck = [k.repeat_interleave(group, 0) for k in ck]
            cv = [v.repeat_interleave(group, 0) for v in cv]
        cfg = self.config
        empty = torch.zeros((cfg.n_text_layer, ck[0].shape[0], 0, cfg.n_text_state), device=self.device)
        return DecoderState(ck, cv, empty, empty.clone())

    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        import torch

        k_names, v_names = cross_names(self.config.n_text_layer)
        feeds = {"tokens": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)),
                 "offset": torch.tensor(state.offset, dtype=torch.int64), "self_k": state.self_k,
                 "self_v": state.self_v, **dict(zip(k_names, state.cross_k)), **dict(zip(v_names, state.cross_v))}
        out = self.decoder(feeds)
        state.self_k, state.self_v = out["new_self_k"], out["new_self_v"]
        state.offset += tokens.shape[1]
        return out["logits"].float().cpu().numpy()

    def reorder(self, state: DecoderState, order: np.ndarray) -> None:
        _reorder_torch(state, order, self.device)

    def truncate(self, state: DecoderState, n: int) -> None:
        truncate_cache(state, n)


def tensorrt_backend(encoder_engine: Path, decoder_engine: Path, config: WhisperConfig, device: str = "cuda"):
    """The `tensorrt` backend: the same interface on TensorRT engines built from the standard-op ONNX export
    (exporters/tensorrt_build.py). Needs the `trt` extra and a CUDA GPU (imported on first use)."""
    return TensorRTWhisperBackend(encoder_engine, decoder_engine, config, device)
