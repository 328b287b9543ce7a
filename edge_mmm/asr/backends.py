"""Whisper inference backends: `torch` (reference, eager) and `onnxruntime` (default on CPU).

Both expose the same small interface used by `edge_mmm.asr.decoding`:
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

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.models.whisper import Whisper, WhisperConfig

BACKENDS = ("torch", "onnxruntime")


@dataclass
class DecoderState:
    cross_k: Any
    cross_v: Any
    self_k: Any
    self_v: Any
    offset: int = 0


class TorchWhisperBackend:
    name = "torch"

    def __init__(self, model: Whisper, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.config: WhisperConfig = model.config

    @torch.inference_mode()
    def encode(self, mel: np.ndarray):
        return self.model.decoder.cross_kv(self.model.encoder(torch.as_tensor(mel, dtype=torch.float32)))

    def new_state(self, audio, group: int) -> DecoderState:
        ck, cv = audio
        if group > 1:
            ck = [k.expand(group, -1, -1, -1).contiguous() for k in ck]
            cv = [v.expand(group, -1, -1, -1).contiguous() for v in cv]
        sk, sv = self.model.empty_cache(ck[0].shape[0])
        return DecoderState(ck, cv, sk, sv)

    @torch.inference_mode()
    def step(self, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
        logits, state.self_k, state.self_v = self.model.decoder(
            torch.from_numpy(np.ascontiguousarray(tokens)), torch.tensor(state.offset),
            state.cross_k, state.cross_v, state.self_k, state.self_v)
        state.offset += tokens.shape[1]
        return logits.numpy()

    def reorder(self, state: DecoderState, order: np.ndarray) -> None:
        idx = torch.from_numpy(order)
        state.self_k, state.self_v = state.self_k[:, idx], state.self_v[:, idx]


class OnnxWhisperBackend:
    name = "onnxruntime"

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
