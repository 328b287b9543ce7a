"""Whisper inference backends: `torch` (reference, eager) and `onnxruntime` (default on CPU).

Both expose the same small interface used by `edge_mmm.asr.decoding`:
    device: where the log-mel front end runs (`kernels.log_mel`: our Triton kernel on CUDA); host for ORT
    encode(mel[B, n_mels, 3000]) -> audio state (cross-attention K/V, computed once per window)
    new_state(audio, group) -> decoder state for `group` parallel hypotheses of that audio
    step(state, tokens[B, T]) -> float32 logits [B, T, n_vocab] (numpy), extending the KV cache
    reorder(state, order) -> keep/duplicate hypotheses (beam search)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from edge_mmm.errors import DeviceError, InputError, ModelFileError
from edge_mmm.models.whisper import Whisper, WhisperConfig, repeat_batch

BACKENDS = ("torch", "onnxruntime")


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

    def __init__(self, model: Whisper, threads: int = 0, device: str = "cpu"):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.config: WhisperConfig = model.config

    @torch.inference_mode()
    def encode(self, mel: np.ndarray):
        mel = torch.as_tensor(mel, dtype=torch.float32, device=self.device)
        return self.model.decoder.cross_kv(self.model.encoder(mel))

    def new_state(self, audio, group: int) -> DecoderState:
        ck, cv = audio
        if group > 1:
            ck = [repeat_batch(k, group) for k in ck]
            cv = [repeat_batch(v, group) for v in cv]
        sk, sv = self.model.empty_cache(ck[0].shape[0])
        return DecoderState(ck, cv, sk, sv)

    @torch.inference_mode()
    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        logits, state.self_k, state.self_v = self.model.decoder(
            torch.as_tensor(np.ascontiguousarray(tokens), device=self.device),
            torch.tensor(state.offset, device=self.device),
            state.cross_k, state.cross_v, state.self_k, state.self_v)
        state.offset += tokens.shape[1]
        return logits.cpu().numpy()

    def reorder(self, state: DecoderState, order: np.ndarray) -> None:
        idx = torch.as_tensor(order, device=self.device)
        state.self_k, state.self_v = state.self_k[:, idx], state.self_v[:, idx]


class OnnxWhisperBackend:
    name = "onnxruntime"
    device = torch.device("cpu")  # the CPU execution provider reads host arrays

    def __init__(self, onnx_dir: Path, config: WhisperConfig, threads: int = 0):
        import onnxruntime as ort

        from edge_mmm.exporters.onnx_whisper import onnx_files

        self.config = config
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        files = onnx_files(onnx_dir)
        try:
            self.encoder = ort.InferenceSession(str(files["encoder"]), opts, providers=["CPUExecutionProvider"])
            self.decoder = ort.InferenceSession(str(files["decoder"]), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelFileError(f"cannot load ONNX Whisper from {onnx_dir}: {exc}") from exc
        from edge_mmm.weights.untrusted import check_onnx_inputs

        check_onnx_inputs(self.encoder, ["mel"], files["encoder"])
        check_onnx_inputs(self.decoder, ["tokens", "offset", "self_k", "self_v"], files["decoder"])

    def encode(self, mel: np.ndarray):
        out = self.encoder.run(None, {"mel": np.ascontiguousarray(mel, dtype=np.float32)})
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
        from edge_mmm.exporters.onnx_whisper import cross_names

        feeds = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64), "offset": np.array(state.offset, np.int64),
                 "self_k": state.self_k, "self_v": state.self_v}
        k_names, v_names = cross_names(self.config.n_text_layer)
        feeds.update(zip(k_names, state.cross_k))
        feeds.update(zip(v_names, state.cross_v))
        logits, state.self_k, state.self_v = self.decoder.run(None, feeds)
        state.offset += tokens.shape[1]
        return logits

    def reorder(self, state: DecoderState, order: np.ndarray) -> None:
        state.self_k, state.self_v = state.self_k[:, order], state.self_v[:, order]


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def check_device(device: str, backend: str) -> str:
    """`device` is "cpu" or a CUDA device ("cuda", "cuda:N"); CUDA needs the torch backend and a GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device must be cpu or cuda[:N], got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda":
        if backend != "torch":
            raise InputError(f"--device {device} needs --backend torch (the {backend} backend here runs on the CPU)")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA GPU is visible to torch on this machine")
    return device


def tensorrt_backend(encoder_engine: Path, decoder_engine: Path, config: WhisperConfig, device: str = "cuda"):
    """The `tensorrt` backend: the same interface on TensorRT engines built from the standard-op ONNX export
    (exporters/tensorrt_build.py). Imported lazily; needs the `trt` extra and a CUDA GPU."""
    from edge_mmm.exporters.tensorrt_runtime import TensorRTWhisperBackend

    return TensorRTWhisperBackend(encoder_engine, decoder_engine, config, device)
