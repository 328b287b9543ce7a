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

from edge_mmm.asr.ort_graphs import DECODER_TRUNK
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


def _reorder_torch(state: DecoderState, order: np.ndarray, device) -> None:
    import torch

    idx = torch.as_tensor(order, device=device)
    state.self_k, state.self_v = state.self_k[:, idx], state.self_v[:, idx]


class OnnxWhisperBackend:
    """Whisper on onnxruntime. Where the graphs come with a decoder trunk and its token table
    (`asr.ort_graphs.write_decoder_trunk`: the export cache's fp32 graphs, a CPU bundle's) and edge-mmm's C
    kernel builds on this host, the decoder runs as the trunk on onnxruntime + the output projection in C over
    the checkpoint's fp16 table (`head` is then the `runners.cpu_lm.CpuHead`); else as the one decoder graph."""

    name = "onnxruntime"
    device = None  # host numpy arrays in and out: the numpy front end, no torch

    def __init__(self, onnx_dir: Path, config: WhisperConfig, threads: int = 0, cache_dir: Optional[Path] = None,
                 cpu_head: bool = True):
        self.config = config
        files = onnx_files(onnx_dir)
        # the decoder runs right after the encoder, the LM right after a pass: idle workers must not spin on
        # the cores those need (2 cores: 15 decoder steps after the encoder 184 -> 132 ms; an LM prefill of 40
        # tokens after a pass 155 -> 121 ms; the decoder's own steps lose ~3 ms a pass)
        self.encoder = ort_session(files["encoder"], "ONNX Whisper encoder", threads, inputs=["mel"],
                                   spin_after_run=False)
        self.head = _cpu_head(Path(onnx_dir), config, threads, cache_dir) if cpu_head else None
        if self.head is not None:
            self.decoder = ort_session(Path(onnx_dir) / DECODER_TRUNK, "ONNX Whisper decoder trunk", threads,
                                       inputs=["token_embeds", "offset", "self_k", "self_v"], spin_after_run=False)
            self._decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        else:
            self.decoder = ort_session(files["decoder"], "ONNX Whisper decoder", threads,
                                       inputs=["tokens", "offset", "self_k", "self_v"], spin_after_run=False)
        # an export with a named (dynamic) frame axis takes short inputs; an older, fixed one only 3000 frames
        self.short_mel = isinstance(self.encoder.get_inputs()[0].shape[2], str)
        self._pass = threading.local()  # the RunOptions of this thread's interruptible pass, if any

    @contextlib.contextmanager
    def interruptible(self):
        """Runs on this thread inside the block can be stopped by the yielded handle's `cancel()` (from
        another thread: onnxruntime's RunOptions.terminate); a stopped run raises PassInterrupted."""
        import onnxruntime as ort

        handle = PassHandle(ort.RunOptions())
        self._pass.run_options = handle.run_options
        try:
            yield handle
        finally:
            self._pass.run_options = None

    def _run(self, session, feeds):
        options = getattr(self._pass, "run_options", None)
        if options is not None and options.terminate:
            raise PassInterrupted("the Whisper pass was interrupted")
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
        cfg = self.config
        empty = np.zeros((cfg.n_text_layer, ck[0].shape[0], 0, cfg.n_text_state), np.float32)
        return DecoderState(ck, cv, empty, empty.copy())

    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        feeds = {"tokens": tokens, "offset": np.array(state.offset, np.int64),
                 "self_k": state.self_k, "self_v": state.self_v}
        k_names, v_names = cross_names(self.config.n_text_layer)
        feeds.update(zip(k_names, state.cross_k))
        feeds.update(zip(v_names, state.cross_v))
        if self.head is None:
            logits, state.self_k, state.self_v = self._run(self.decoder, feeds)
        else:
            table = self.head.table
            if tokens.size and (tokens.min() < 0 or tokens.max() >= table.shape[0]):
                raise InputError(f"Whisper token ids must be in [0, {table.shape[0]}), "
                                 f"got {tokens.min()}..{tokens.max()}")
            feeds["token_embeds"] = table[tokens].astype(np.float32)
            feeds = {k: v for k, v in feeds.items() if k in self._decoder_inputs}
            hidden, state.self_k, state.self_v = self._run(self.decoder, feeds)
            logits = self.head(hidden).reshape(*tokens.shape, table.shape[0])
        state.offset += tokens.shape[1]
        return logits

    def reorder(self, state: DecoderState, order: np.ndarray) -> None:
        state.self_k, state.self_v = state.self_k[:, order], state.self_v[:, order]


def _cpu_head(onnx_dir: Path, config: WhisperConfig, threads: int, cache_dir: Optional[Path]):
    """The C output projection over the table beside a decoder trunk in `onnx_dir`, or None (no trunk there:
    an int8 export, a GPU bundle's graphs; no kernel on this host: `runners.cpu_lm.host_library`)."""
    from edge_mmm.asr.ort_graphs import read_decoder_head
    from edge_mmm.runners.cpu_lm import CpuHead, host_library
    from edge_mmm.weights.export_cache import default_cache_root

    try:
        table = read_decoder_head(onnx_dir)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"Whisper decoder head in {onnx_dir}: {exc}") from exc
    if table is None:
        return None
    if table.shape != (config.n_vocab, config.n_text_state):
        raise ModelFileError(f"{onnx_dir}: the decoder's token table is {table.shape}, the config says "
                             f"{(config.n_vocab, config.n_text_state)}")
    lib = host_library(Path(cache_dir) if cache_dir else default_cache_root())
    return None if lib is None else CpuHead(lib, table, threads)


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


def tensorrt_backend(encoder_engine: Path, decoder_engine: Path, config: WhisperConfig, device: str = "cuda"):
    """The `tensorrt` backend: the same interface on TensorRT engines built from the standard-op ONNX export
    (exporters/tensorrt_build.py). Needs the `trt` extra and a CUDA GPU (imported on first use)."""
    return TensorRTWhisperBackend(encoder_engine, decoder_engine, config, device)
