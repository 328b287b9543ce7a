"""Export a `Llama` (edge_mmm.models.llama) to ONNX for onnxruntime's CPU EP, built node by node.

Graph (per layer): SkipSimplifiedLayerNormalization -> MatMulNBits(q|k|v fused) -> GroupQueryAttention
(RoPE + KV append inside) -> MatMulNBits(o) -> SkipSimplifiedLayerNormalization -> MatMulNBits(gate|up)
-> SiLU * up -> MatMulNBits(down). Quantized linears map onto `com.microsoft::MatMulNBits` as in
docs/quantization.md, with one change for speed: an offset (asymmetric, e.g. GGUF Q4_1) weight
`W = q*s + z` is split into `(q - 8)*s` (MatMulNBits with its default zero point, the fast path) plus
`(8*s + z)` times the per-group sums of `x` (a small dense MatMul), because onnxruntime's CPU kernel
for float zero points dequantizes the whole matrix on every call (~30x slower). This is how llama.cpp
computes Q4_1 too. INT8 uses MatMulNBits bits=8 (codes + 128, default zero point 128).

I/O: `input_ids` [batch, seq] int64; `position_ids` [batch, seq] int64 (batch rows are unpadded and
contiguous: GroupQueryAttention derives every position from the last one, `seqlens_k = last`);
`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim]; outputs `logits` [batch, 1 or seq,
vocab] and `present.{i}.key/value` [batch, kv_heads, past + seq, head_dim]. A caller may bind past and
present to one preallocated buffer (GroupQueryAttention's shared-buffer mode); then `past` is the
buffer length and `position_ids` says how much of it is valid.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from edge_mmm.errors import InputError
from edge_mmm.exporters.versions import ONNX_LM as EXPORTER_VERSION
from edge_mmm.models.llama import Llama
from edge_mmm.quant.linear import QuantLinear
from edge_mmm.runners.ort_session import keep_unpacked
from edge_mmm.quant.packed import SYMMETRIC_INT4_ZERO, PackedWeight
from edge_mmm.quant.quantize import quantize_weight

OPSET = 17
MS_DOMAIN = "com.microsoft"


@dataclass
class OnnxLMOptions:
    """Export choices. `accuracy_level` 4 lets MatMulNBits quantize activations to int8 per block
    (as llama.cpp does; ~4x faster on CPU), 0 keeps fp32 activations for 4-bit weights (8-bit
    weights always use 4, see `_accuracy`). `fp32_linears`: linears, by name suffix (`attn.qkv`,
    `attn.o`, `mlp.gate_up`, `mlp.down`), whose 4-bit weights keep fp32 activations (level 0) whatever
    `accuracy_level` says. `head_bits` quantizes a float
    LM head (8 is lossless for a head that came from GGUF Q8_0; None keeps it float). `exact_int8_head`: an
    8-bit head keeps fp32 activations (`_int8_rows`: logits equal a float head's to fp32 rounding, at the
    INT8 kernel's speed; else its input is rounded to int8 as in llama.cpp).
    `all_logits` returns logits for every position (else only the last one). A float head is a MatMul
    on its table stored transposed and kept unpacked (`keep_unpacked`); a tied embedding gathers from that
    same table, so it costs no extra memory."""

    accuracy_level: int = 4
    head_bits: Optional[int] = 8
    head_group_size: int = 32
    all_logits: bool = False
    fp32_linears: Tuple[str, ...] = ()
    exact_int8_head: bool = False
    inputs_embeds: bool = False  # input `inputs_embeds` [batch, seq, hidden] instead of `input_ids` (a VLM)

    def __post_init__(self):
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.head_bits not in (None, 4, 8):
            raise InputError(f"head_bits must be 4, 8 or None, got {self.head_bits}")
        unknown = set(self.fp32_linears) - set(LINEAR_NAMES)
        if unknown:
            raise InputError(f"fp32_linears: unknown linear(s) {sorted(unknown)}; known: {', '.join(LINEAR_NAMES)}")


LINEAR_NAMES = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
HEAD_NAME = "lm_head"


def int8_head_is_lossless(model: Llama, group_size: int = 32) -> bool:
    """True when the LM head re-quantized to symmetric INT8 (groups of `group_size`) gives back exactly its
    weights: a head that came from GGUF Q8_0. Then an INT8 head (`head_bits=8`) costs only llama.cpp's own
    activation rounding, not a second weight rounding."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.in_features % group_size:
        return False
    w = head.weight.detach().float()
    return bool(torch.equal(quantize_weight(w, 8, group_size, symmetric=True).dequantize(torch.float32), w))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self):
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self._n = 0
        self._small = {}  # name -> value of the small constants that nodes share

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shared_const(self, name: str, array: np.ndarray) -> str:
        """A small constant made once however many nodes use it."""
        if name not in self._small:
            self._small[name] = array
            self.const(name, array)
        elif not np.array_equal(self._small[name], array):
            raise ValueError(f"constant {name!r} defined twice with different values")
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", name: str = "",
           outputs: Optional[Sequence[str]] = None, **attrs) -> Union[str, List[str]]:
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = list(outputs) if outputs is not None else [f"{base}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def _fusable(packs: Sequence[PackedWeight]) -> bool:
    first = packs[0]
    return all(p.bits == first.bits and p.group_size == first.group_size and p.symmetric == first.symmetric
               and p.in_features == first.in_features for p in packs)


def _concat_packed(packs: Sequence[PackedWeight]) -> PackedWeight:
    if len(packs) == 1:
        return packs[0]
    zeros = None if packs[0].zeros is None else torch.cat([p.zeros.float() for p in packs])
    return PackedWeight(torch.cat([p.qweight for p in packs]), torch.cat([p.scales.float() for p in packs]),
                        zeros, packs[0].bits, packs[0].group_size,
                        (sum(p.out_features for p in packs), packs[0].in_features))


def _check_block(packed: PackedWeight, name: str) -> None:
    gs = packed.group_size
    if gs < 16 or gs & (gs - 1):
        raise InputError(f"{name}: group_size {gs} cannot be exported to MatMulNBits "
                         f"(needs a power of two >= 16)")


class _Builder:
    def __init__(self, model: Llama, opts: OnnxLMOptions):
        self.model, self.cfg, self.opts = model, model.config, opts
        self.g = _Graph()
        self._gsum_cache = {}
        self._made = set()
        self._float_names = {}

    # ------------------------------------------------------------------ linears
    def _group_sums(self, x: str, k: int, group_size: int) -> str:
        """[rows, K] -> [rows, ceil(K/group)] sums of x over each group, as one MatMul with a 0/1 matrix."""
        key = (x, group_size)
        if key not in self._gsum_cache:
            n_groups = -(-k // group_size)
            member = (np.arange(k)[:, None] // group_size == np.arange(n_groups)[None, :]).astype(np.float32)
            self._gsum_cache[key] = self.g.op("MatMul", [x, self.g.const(f"{x}_groups{group_size}", member)])
        return self._gsum_cache[key]

    def _float_weight(self, weight: torch.Tensor, name: str) -> str:
        """One float initializer per parameter object (a tied head and the embedding share it)."""
        if id(weight) not in self._float_names:
            self._float_names[id(weight)] = self.g.const(name, _np(weight.float()))
        return self._float_names[id(weight)]

    def _nbits_initializers(self, packed: PackedWeight, name: str) -> None:
        """`{name}.B` and `{name}.scales` in MatMulNBits' layout (same bytes as ours; INT8 codes + 128)."""
        _check_block(packed, name)
        if f"{name}.B" in self._made:
            return
        self._made.add(f"{name}.B")
        n, n_groups, gs = packed.out_features, packed.n_groups, packed.group_size
        if packed.bits == 8:
            b = (packed.qweight.to(torch.int16) + 128).to(torch.uint8).view(n, n_groups, gs)
        else:
            b = packed.qweight.view(n, n_groups, gs // 2)
        self.g.const(f"{name}.B", _np(b))
        self.g.const(f"{name}.scales", _np(packed.scales.float().reshape(-1)))

    def _matmul_nbits(self, x: str, packed: PackedWeight, name: str) -> str:
        g = self.g
        self._nbits_initializers(packed, name)
        n, k = packed.shape
        gs = packed.group_size
        level = self._accuracy(packed.bits, name)
        split = self.opts.exact_int8_head and packed.bits == 8 and name == HEAD_NAME
        y = g.op("MatMulNBits", [self._int8_rows(x, k, gs) if split else x, f"{name}.B", f"{name}.scales"],
                 domain=MS_DOMAIN, name=name, K=k, N=n, bits=packed.bits, block_size=gs,
                 accuracy_level=4 if split else level)
        if split:  # [3 * rows, N] -> the sum of the three rows' products
            rows = g.op("Reshape", [y, g.shared_const(f"int8_rows.sum_shape{n}", np.array([3, -1, n], np.int64))])
            y = g.op("ReduceSum", [rows, g.shared_const("int8_rows.sum_axis", np.array([0], np.int64))], keepdims=0)
        if packed.zeros is None:
            return y
        # W = q*s + z = (q - 8)*s + (8*s + z): the second term is per-group, so it acts on group sums.
        offset = (SYMMETRIC_INT4_ZERO * packed.scales.float() + packed.zeros.float()).t().contiguous()  # [G, N]
        return g.op("Gemm", [self._group_sums(x, k, gs), g.const(f"{name}.group_offsets", _np(offset)), y])

    def _int8_rows(self, x: str, k: int, group_size: int) -> str:
        """[rows, K] -> [3 * rows, K]: x = x1 + x2 + x3 where x1 and x2 round to int8 exactly per block of
        `group_size` (whole multiples of a scale s, 127 * s at the largest) and x3 is the rest (|x3| <= 1.6e-5 of
        the block's largest |x|). MatMulNBits' int8 kernel (accuracy level 4) rounds each row per block to int8
        with scale max|row|/127: x1 and x2 come back as the same codes, x3 within half a step (6e-8 of x), so
        the three rows' products add up to x @ W at fp32 precision. Costs 20 small nodes; pays off only for
        8-bit weights, which onnxruntime's CPU kernel otherwise dequantizes on every call at fp32 activations."""
        g = self.g
        blocks = g.op("Reshape", [x, g.shared_const(f"int8_rows.blocks{k}x{group_size}",
                                                    np.array([-1, k // group_size, group_size], np.int64))])
        rows, rest = [], blocks
        for _ in range(2):
            amax = g.op("ReduceMax", [g.op("Abs", [rest])], axes=[-1], keepdims=1)
            scale = g.op("Max", [g.op("Mul", [amax, g.shared_const("int8_rows.inv127", np.array(1 / 127, np.float32))]),
                                 g.shared_const("int8_rows.tiny", np.array(1e-30, np.float32))])
            part = g.op("Mul", [g.op("Round", [g.op("Div", [rest, scale])]), scale])
            rows.append(part)
            rest = g.op("Sub", [rest, part])
        out = g.op("Reshape", [g.op("Concat", rows + [rest], axis=0),
                               g.shared_const(f"int8_rows.flat{k}", np.array([-1, k], np.int64))])
        return out

    def linear(self, x: str, modules: Sequence[nn.Module], name: str) -> str:
        """`x @ [W_1; W_2; ...].T (+ biases)`: one fused node when the weights share a format."""
        g = self.g
        biases = [m.bias for m in modules]
        if all(isinstance(m, QuantLinear) for m in modules) and _fusable([m.packed for m in modules]):
            y = self._matmul_nbits(x, _concat_packed([m.packed for m in modules]), name)
        elif all(type(m) is nn.Linear for m in modules):
            if len(modules) == 1:
                w = self._float_weight(modules[0].weight, f"{name}.weight")
            else:
                w = g.const(f"{name}.weight", _np(torch.cat([m.weight.detach().float() for m in modules])))
            y = g.op("Gemm", [x, w], transB=1)  # [N, K] as stored: a tied head shares the embedding table
        else:
            parts = [self.linear(x, [m], f"{name}.{i}") for i, m in enumerate(modules)]
            return g.op("Concat", parts, axis=-1)
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(m.out_features)
                              for b, m in zip(biases, modules)])
            y = g.op("Add", [y, g.const(f"{name}.bias", _np(bias))])
        return y

    # ------------------------------------------------------------------ head / embedding
    def head_and_embedding(self):
        """The LM head as a module, and whether the embedding can gather from its INT8 codes."""
        head = self.model.lm_head
        emb = self.model.embed_tokens.weight.detach()
        if type(head) is nn.Linear and self.opts.head_bits is not None:
            packed = quantize_weight(head.weight.detach().float(), self.opts.head_bits, self.opts.head_group_size,
                                     symmetric=True)
            head = QuantLinear.from_packed(packed)
        shares = (isinstance(head, QuantLinear) and head.bits == 8 and head.packed.shape == tuple(emb.shape)
                  and torch.equal(head.packed.dequantize(torch.float32), emb.float()))
        return head, shares

    def _float_head_table(self, head: nn.Linear, name: str) -> str:
        """A float head's weight stored transposed, [K, N]: the head runs as MatMul on it unpacked
        (`keep_unpacked`; one row per call: MLAS's M=1 kernel streams it, as fast as a prepacked copy would
        be) and a tied embedding gathers its columns, so the table is in memory once."""
        key = ("t", id(head.weight))
        if key not in self._float_names:
            self._float_names[key] = self.g.const(f"{name}.weight_t", _np(head.weight.detach().float().t().contiguous()))
        return self._float_names[key]

    def float_head(self, x: str, head: nn.Linear, name: str) -> str:
        y = self.g.op("MatMul", [x, self._float_head_table(head, name)])
        if head.bias is not None:
            y = self.g.op("Add", [y, self.g.const(f"{name}.bias", _np(head.bias.detach().float()))])
        return y

    def embedding(self, ids: str, head: nn.Module, shares: bool, head_name: str) -> str:
        g = self.g
        if type(head) is nn.Linear and head.weight is self.model.embed_tokens.weight:  # tied float head
            cols = g.op("Gather", [self._float_head_table(head, head_name), ids], axis=1)  # [K, b, t]
            return g.op("Transpose", [cols], perm=[1, 2, 0])
        if not shares:
            table = self._float_weight(self.model.embed_tokens.weight, "embed_tokens.weight")
            return g.op("Gather", [table, ids], axis=0)
        # Rows of the INT8 head are the embedding: gather codes + scales, dequantize the few rows.
        packed = head.packed
        codes = g.op("Gather", [f"{head_name}.B", ids], axis=0)                     # [b, t, G, gs] uint8
        scales = g.op("Reshape", [f"{head_name}.scales", g.const("embed.scale_shape",
                                                                  np.array([packed.out_features, -1, 1],
                                                                           np.int64))])
        s = g.op("Gather", [scales, ids], axis=0)                                    # [b, t, G, 1]
        q = g.op("Sub", [g.op("Cast", [codes], to=TensorProto.FLOAT), g.const("embed.zero", np.float32(128))])
        w = g.op("Mul", [q, s])
        return g.op("Reshape", [w, g.const("embed.out_shape", np.array([0, 0, -1], np.int64))])

    # ------------------------------------------------------------------ graph
    def build(self) -> onnx.ModelProto:
        cfg, g, m = self.cfg, self.g, self.model
        nl, nkv, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        first = (helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size])
                 if self.opts.inputs_embeds else helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                ["batch", "seq"]))
        inputs = [first, helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch", "seq" if self.opts.all_logits else 1, cfg.vocab_size])]
        for i in range(nl):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                            ["batch", nkv, "past_seq", hd]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                             ["batch", nkv, "total_seq", hd]))

        # GroupQueryAttention bookkeeping: seqlens_k = last position, total = max(last) + 1.
        last = g.op("Gather", ["position_ids", g.const("last_index", np.array(-1, np.int64))], axis=1)
        seqlens_k = g.op("Cast", [last], to=TensorProto.INT32)
        total = g.op("Cast", [g.op("Add", [g.op("ReduceMax", [last], keepdims=0),
                                           g.const("one", np.array(1, np.int64))])], to=TensorProto.INT32)
        freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None] * m.rotary.inv_freq.float()[None]
        cos = g.const("rope.cos", _np(freqs.cos()))
        sin = g.const("rope.sin", _np(freqs.sin()))

        head, shares = self.head_and_embedding()
        head_name = HEAD_NAME
        if shares and not self.opts.inputs_embeds:  # the embedding gathers rows of the head's initializers
            self._nbits_initializers(head.packed, head_name)
        # Rows = batch * seq: linears and norms run on 2-D tensors (Gemm folds the offset term).
        shape_2d = g.const("rows_shape", np.array([-1, cfg.hidden_size], np.int64))
        if self.opts.inputs_embeds:  # the caller embedded the ids (and spliced image features in)
            bt = g.op("Shape", ["inputs_embeds"], end=2)
            x = g.op("Reshape", ["inputs_embeds", shape_2d])
        else:
            bt = g.op("Shape", ["input_ids"])
            x = g.op("Reshape", [self.embedding("input_ids", head, shares, head_name), shape_2d])
        shape_3d = g.op("Concat", [bt, g.const("minus_one", np.array([-1], np.int64))], axis=0)
        residual, pending = x, None
        for i, layer in enumerate(m.layers):
            p = f"layers.{i}"
            h, residual = self.norm(residual, pending, layer.input_layernorm, f"{p}.input_layernorm")
            at = layer.self_attn
            qkv = self.linear(h, [at.q_proj, at.k_proj, at.v_proj], f"{p}.attn.qkv")
            qkv = g.op("Reshape", [qkv, shape_3d])
            attn = g.op("GroupQueryAttention",
                        [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total,
                         cos, sin], domain=MS_DOMAIN, name=f"{p}.attn",
                        outputs=[f"{p}.attn_out", f"present.{i}.key", f"present.{i}.value"],
                        num_heads=cfg.num_heads, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
                        scale=float(hd) ** -0.5)[0]
            attn = g.op("Reshape", [attn, g.const(f"{p}.attn_rows", np.array([-1, cfg.num_heads * hd], np.int64))])
            o = self.linear(attn, [at.o_proj], f"{p}.attn.o")
            h, residual = self.norm(residual, o, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            mlp = layer.mlp
            gate_up = self.linear(h, [mlp.gate_proj, mlp.up_proj], f"{p}.mlp.gate_up")
            gate, up = g.op("Split", [gate_up, g.const(f"{p}.mlp.split", np.array(
                [cfg.intermediate_size, cfg.intermediate_size], np.int64))], n_out=2, axis=-1)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
            pending = self.linear(act, [mlp.down_proj], f"{p}.mlp.down")
        residual = g.op("Reshape", [residual, shape_3d])
        pending = g.op("Reshape", [pending, shape_3d])
        if not self.opts.all_logits:
            residual = self._last(residual)
            pending = self._last(pending)
        h, _ = self.norm(residual, pending, m.norm, "norm")
        h = g.op("Reshape", [h, shape_2d])
        batch = g.op("Slice", [bt, g.const("batch_start", np.array([0], np.int64)),
                               g.const("batch_end", np.array([1], np.int64))])
        logits_shape = g.op("Concat", [batch, g.const("logits_tail", np.array([-1, cfg.vocab_size], np.int64))],
                            axis=0)
        logits = g.op("Reshape", [self.float_head(h, head, head_name) if type(head) is nn.Linear
                                  else self.linear(h, [head], head_name), logits_shape])
        g.op("Identity", [logits], outputs=["logits"])

        graph = helper.make_graph(g.nodes, "edge_mmm_llama", inputs, outputs, g.inits)
        if type(head) is nn.Linear:  # a float head: one copy of its table (tied: the embedding's too), unpacked
            keep_unpacked(graph, [self._float_head_table(head, head_name)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="edge-mmm", producer_version=EXPORTER_VERSION)
        model.ir_version = 8
        return model

    def _last(self, x: str) -> str:
        g = self.g
        return g.op("Slice", [x, g.const(f"{x}_s", np.array([-1], np.int64)),
                              g.const(f"{x}_e", np.array([np.iinfo(np.int64).max], np.int64)),
                              g.const(f"{x}_a", np.array([1], np.int64))])

    def _accuracy(self, bits: int, name: str) -> int:
        # onnxruntime 1.32's CPU MatMulNBits has no fp32-activation kernel for 8-bit weights: it would
        # dequantize the whole matrix on every call (~50x slower), so 8-bit always takes the int8 path
        # (fp32 activations through it: `exact_int8_head`).
        if bits == 8:
            return 4
        base = re.sub(r"(\.\d+)+$", "", name)  # the parts of an unfused linear: "{name}.{i}"
        if any(base.endswith(suffix) for suffix in self.opts.fp32_linears):
            return 0
        return self.opts.accuracy_level

    def norm(self, residual: str, add: Optional[str], module: nn.Module, name: str):
        """RMSNorm of `residual + add` -> (normalized, new residual)."""
        g = self.g
        gamma = g.const(f"{name}.weight", _np(module.weight.float()))
        if add is None:
            return g.op("SimplifiedLayerNormalization", [residual, gamma], name=name, axis=-1,
                        epsilon=float(module.eps)), residual
        outs = g.op("SkipSimplifiedLayerNormalization", [residual, add, gamma], domain=MS_DOMAIN, name=name,
                    outputs=[f"{name}_out", "", "", f"{name}_sum"], epsilon=float(module.eps))
        return outs[0], outs[3]


def build_llama_onnx(model: Llama, options: Optional[OnnxLMOptions] = None) -> onnx.ModelProto:
    """The ONNX graph of `model` (float or with QuantLinear layers) as a ModelProto."""
    model = model.eval()
    with torch.no_grad():
        return _Builder(model, options or OnnxLMOptions()).build()


def export_llama_onnx(model: Llama, path: Union[str, Path], options: Optional[OnnxLMOptions] = None) -> Path:
    """Write the model's ONNX to `path` atomically (temp file, then os.replace)."""
    path = Path(path)
    proto = build_llama_onnx(model, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
