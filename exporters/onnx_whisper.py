"""ONNX export of Whisper: an encoder graph (mel -> cross-attention K/V of every decoder layer) and a decoder
graph with explicit self-attention KV-cache inputs/outputs. Checked against the eager model on export.
"""

from __future__ import annotations

import types
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_mmm.audio.constants import N_FRAMES
from edge_mmm.errors import ModelFileError
from edge_mmm.exporters import TORCH_EXPORT_LOCK
from edge_mmm.models.whisper import DECODER_FILE, ENCODER_FILE, Whisper, cross_names, onnx_files  # noqa: F401
from edge_mmm.models.whisper_config import EXPORTER_VERSION  # noqa: F401  (named beside the file names, torch-free)

OPSET = 17


class _OrtMultiHeadAttention(torch.autograd.Function):
    """Unmasked self-attention of [B, T, D] projections. Eager: SDPA, as the model computes it. Exported as
    one `com.microsoft::MultiHeadAttention` node: onnxruntime's fused kernel (~11% faster encoder on CPU);
    TensorRT cannot parse it, so only the onnxruntime backend asks for it."""

    @staticmethod
    def forward(ctx, q, k, v, n_head: int):
        b, t, d = q.shape
        split = lambda x: x.view(b, t, n_head, d // n_head).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, t, d)

    @staticmethod
    def symbolic(g, q, k, v, n_head: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=n_head)
        out.setType(q.type())  # same shape and dtype as the query: lets the exporter infer shapes
        return out


@contextmanager
def _fused_encoder_attention(model: Whisper):
    """Within the block, encoder self-attention exports as the fused onnxruntime op."""
    def fused_attend(attn, q, k, v, mask=None):
        return attn.out(_OrtMultiHeadAttention.apply(q, k, v, attn.n_head))

    attns = [blk.attn for blk in model.encoder.blocks]
    for attn in attns:
        attn.attend = types.MethodType(fused_attend, attn)
    try:
        yield
    finally:
        for attn in attns:
            del attn.attend


class _EncoderWithCrossKV(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.model = model

    def forward(self, mel):
        ks, vs = self.model.decoder.cross_kv(self.model.encoder(mel))
        return (*ks, *vs)


class _Decoder(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.decoder = model.decoder
        self.n_layer = model.config.n_text_layer

    def forward(self, tokens, offset, self_k, self_v, *cross):
        return self.decoder(tokens, offset, cross[: self.n_layer], cross[self.n_layer :], self_k, self_v)


@dataclass
class ExportCheck:
    encoder_max_abs_err: float
    decoder_max_abs_err: float


def export_whisper_onnx(model: Whisper, out_dir: Path, check: bool = True,
                        ort_fused_attention: bool = False, dynamic_frames: bool = False) -> ExportCheck | None:
    """Write encoder.onnx and decoder.onnx (fp32) to `out_dir` and compare them with eager on random inputs.

    `ort_fused_attention`: the encoder's self-attention becomes onnxruntime's fused MultiHeadAttention
    (for the onnxruntime backend; keep False for graphs meant for TensorRT, which supports standard ops only).
    `dynamic_frames`: the encoder takes any even number of mel frames up to 3000 (the positional embedding
    is sliced, as whisper.cpp's audio_ctx does) and the decoder cross-attends over as many positions; else
    both are fixed to the 30 s window (what the TensorRT profiles and Triton configs expect).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model = model.float().eval()
    mel = torch.randn(1, cfg.n_mels, N_FRAMES)
    enc = _EncoderWithCrossKV(model)
    dec = _Decoder(model)
    with torch.no_grad():
        cross = enc(mel)
    tokens = torch.tensor([[min(50257, cfg.n_vocab - 1)] * 3])
    past = (cfg.n_text_layer, 1, 2, cfg.n_text_state)
    self_k, self_v = torch.randn(past), torch.randn(past)
    offset = torch.tensor(2, dtype=torch.int64)
    k_names, v_names = cross_names(cfg.n_text_layer)
    # cross K^T [B, H, Dh, audio], V [B, H, audio, Dh]
    batch_axes = {**{name: {0: "batch", **({3: "audio"} if dynamic_frames else {})} for name in k_names},
                  **{name: {0: "batch", **({2: "audio"} if dynamic_frames else {})} for name in v_names}}
    mel_axes = {0: "batch", 2: "frames"} if dynamic_frames else {0: "batch"}
    with TORCH_EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _fused_encoder_attention(model) if ort_fused_attention else nullcontext():
            torch.onnx.export(enc, (mel,), str(out_dir / ENCODER_FILE), input_names=["mel"],
                              output_names=k_names + v_names, opset_version=OPSET, dynamo=False,
                              dynamic_axes={"mel": mel_axes, **batch_axes},
                              custom_opsets={"com.microsoft": 1} if ort_fused_attention else None)
        torch.onnx.export(dec, (tokens, offset, self_k, self_v, *cross), str(out_dir / DECODER_FILE),
                          input_names=["tokens", "offset", "self_k", "self_v"] + k_names + v_names,
                          output_names=["logits", "new_self_k", "new_self_v"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"tokens": {0: "batch", 1: "new"}, **batch_axes,
                                        "self_k": {1: "batch", 2: "past"}, "self_v": {1: "batch", 2: "past"},
                                        "logits": {0: "batch", 1: "new"},
                                        "new_self_k": {1: "batch", 2: "total"}, "new_self_v": {1: "batch", 2: "total"}})
    _share_tied_embedding(out_dir / DECODER_FILE, "decoder.token_embedding.weight")
    if not check:
        return None
    return check_whisper_onnx(model, out_dir, frames=N_FRAMES // 6 if dynamic_frames else N_FRAMES)


def _share_tied_embedding(path: Path, embedding: str) -> None:
    """Make the output projection read the token embedding itself (Gemm transB=1) instead of the transposed
    copy that the exporter constant-folds: the decoder file shrinks by n_vocab * d floats (80 MB for tiny)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    if embedding not in inits:
        return
    emb = numpy_helper.to_array(inits[embedding])
    for idx, node in enumerate(proto.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        cand = inits[node.input[1]]
        if list(cand.dims) != [emb.shape[1], emb.shape[0]] or not np.array_equal(numpy_helper.to_array(cand), emb.T):
            continue
        gemm = helper.make_node("Gemm", [node.input[0], embedding], list(node.output), name=node.name + "_tied",
                                transB=1)
        proto.graph.node.remove(node)
        proto.graph.node.insert(idx, gemm)
        if not any(cand.name in n.input for n in proto.graph.node):
            proto.graph.initializer.remove(cand)
        break
    onnx.save(proto, str(path))


PRECISIONS = ("fp32", "int8")


def quantize_whisper_onnx(src_dir: Path, out_dir: Path) -> None:
    """INT8 weights for every weight MatMul/Gemm of both graphs (onnxruntime dynamic quantization,
    per-channel int8; activations quantized per call). Attention (activation x activation) stays fp32.
    `reduce_range` (7-bit weights): x86 CPUs without VNNI compute u8 x s8 with int16 pair sums that saturate
    on full-range weights (benchmarks/asr.py WER 0.255 without it, 0.191 with it; fp32 0.176)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
    try:
        for name in (ENCODER_FILE, DECODER_FILE):
            quantize_dynamic(str(Path(src_dir) / name), str(Path(out_dir) / name), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=True)
    finally:
        root.setLevel(level)


def check_whisper_onnx(model: Whisper, out_dir: Path, seed: int = 0, frames: int = N_FRAMES) -> ExportCheck:
    """Max abs error of the ONNX graphs vs eager on fresh random inputs (new shapes, not the export ones;
    `frames` mel frames: fewer than 3000 checks a `dynamic_frames` export)."""
    import onnxruntime as ort

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(1, cfg.n_mels, frames, generator=g)
    enc_sess = ort.InferenceSession(str(Path(out_dir) / ENCODER_FILE), providers=["CPUExecutionProvider"])
    dec_sess = ort.InferenceSession(str(Path(out_dir) / DECODER_FILE), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ck, cv = model.decoder.cross_kv(model.encoder(mel))
        sk, sv = model.empty_cache(2)
        ck2, cv2 = [k.repeat(2, 1, 1, 1) for k in ck], [v.repeat(2, 1, 1, 1) for v in cv]
        tokens = torch.randint(0, cfg.n_vocab, (2, 4), generator=g)
        logits, nk, nv = model.decoder(tokens, torch.tensor(0), ck2, cv2, sk, sv)
        step = torch.randint(0, cfg.n_vocab, (2, 1), generator=g)
        logits2, _, _ = model.decoder(step, torch.tensor(4), ck2, cv2, nk, nv)
    outs = enc_sess.run(None, {"mel": mel.numpy()})
    enc_err = max(np.abs(o - t.numpy()).max() for o, t in zip(outs, [*ck, *cv]))
    k_names, v_names = cross_names(cfg.n_text_layer)
    feeds = {"tokens": tokens.numpy(), "offset": np.array(0, np.int64), "self_k": sk.numpy(), "self_v": sv.numpy(),
             **{n: t.numpy() for n, t in zip(k_names + v_names, [*ck2, *cv2])}}
    ol, onk, onv = dec_sess.run(None, feeds)
    feeds.update(tokens=step.numpy(), offset=np.array(4, np.int64), self_k=onk, self_v=onv)
    ol2 = dec_sess.run(None, feeds)[0]
    dec_err = max(np.abs(ol - logits.numpy()).max(), np.abs(ol2 - logits2.numpy()).max())
    return ExportCheck(float(enc_err), float(dec_err))


def require_files(out_dir: Path) -> None:
    for name, path in onnx_files(out_dir).items():
        if not path.exists():
            raise ModelFileError(f"ONNX {name} missing: {path}")
