"""Our Triton kernels as TensorRT plugins (`tensorrt.plugin`, "quickly deployable plugins"), and the ONNX
nodes that call them.

Plugins (namespace `edge_mmm`, ONNX domain `edge_mmm`):
- `edge_mmm::rms_norm(x, weight; eps) -> y`                     kernels/rms_norm.py
- `edge_mmm::add_rms_norm(x, residual, weight; eps) -> (y, x + residual)`
- `edge_mmm::wxa16_matmul(x, qweight, scales; bits, group_size) -> x @ W.T`   kernels/quant_matmul.py
  (W4A16 / W8A16 GEMV at decode, GEMM at prefill; weights in docs/quantization.md's packed layout)

TensorRT maps an ONNX node to a plugin when the node's op type is the plugin name and its string attribute
`plugin_namespace` names the namespace (since TensorRT 10.10 the node's domain works too); a bool attribute
`aot` = 1 picks the ahead-of-time implementation; other attributes map to plugin attributes by name
(NVIDIA/TensorRT samples/python/quickly_deployable_plugins/README.md, "ONNX model with a plugin").

Implementations: `@trtp.impl` (just-in-time, TensorRT >= 10.6) launches our kernels through their Python
launchers on TensorRT's stream, so the engine needs this module imported in the process that runs it.
`@trtp.aot_impl` (TensorRT >= 10.9; PTX only) is provided for rms_norm: the Triton kernel is compiled to PTX
at build time and the engine then runs without Python. Plugin attributes are not serialized with an AOT
implementation, so eps is folded into the PTX as a constant (tensorrt.plugin.aot_impl docs; research notes
in anchors-kernels-style.md A3). JetPack 6.x ships TensorRT 10.3, which has no `tensorrt.plugin` at all:
there these plugins are unavailable and `register_plugins` says so.

CPU-side (no TensorRT needed): the ONNX node builders, their output shapes, `to_plugin_graph` (rewrites the LM
graph's RMSNorm and MatMulNBits nodes into plugin nodes, converting the weights to our layout) and
reference implementations for `onnx.reference` so a rewritten graph can be evaluated on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np

from edge_mmm.errors import DeviceError, InputError, ModelFileError, require
from edge_mmm.kernels.dispatch import jit
from edge_mmm.kernels.rms_norm import _rms_norm_kernel  # noqa: F401  (called by the AOT wrapper kernel)

tl = None  # triton.language, bound by dispatch.jit on first launch

NAMESPACE = "edge_mmm"
DOMAIN = "edge_mmm"
RMS_NORM, ADD_RMS_NORM, WXA16_MATMUL = "rms_norm", "add_rms_norm", "wxa16_matmul"
PLUGIN_NAMES = (RMS_NORM, ADD_RMS_NORM, WXA16_MATMUL)
QDP_MIN_VERSION = (10, 6)  # tensorrt.plugin appears in TensorRT 10.6 (release notes)
AOT_MIN_VERSION = (10, 9)  # ahead-of-time Python plugins: TensorRT 10.9


def plugin_op_names() -> List[str]:
    """The ops our plugins implement, as tensorrt_ops' checker names them ("domain::Op")."""
    return [f"{DOMAIN}::{name}" for name in PLUGIN_NAMES]


def plugin_ops_in(onnx_path: Union[str, Path]) -> List[str]:
    """Our plugin ops used by an ONNX file (sorted "domain::Op")."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == DOMAIN})


# ----------------------------------------------------------------------------------------------------------
# ONNX nodes and their shapes
# ----------------------------------------------------------------------------------------------------------
def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, aot: bool, **attrs):
    from onnx import helper

    return helper.make_node(op, list(inputs), list(outputs), name=name or None, domain=DOMAIN,
                            plugin_namespace=NAMESPACE, aot=int(aot), **attrs)


def rms_norm_node(x: str, weight: str, out: str, eps: float, name: str = "", aot: bool = False):
    return _node(RMS_NORM, [x, weight], [out], name, aot, eps=float(eps))


def add_rms_norm_node(x: str, residual: str, weight: str, out: str, out_sum: str, eps: float, name: str = ""):
    return _node(ADD_RMS_NORM, [x, residual, weight], [out, out_sum], name, False, eps=float(eps))


def wxa16_matmul_node(x: str, qweight: str, scales: str, out: str, bits: int, group_size: int, name: str = ""):
    if bits not in (4, 8):
        raise InputError(f"wxa16_matmul: bits must be 4 or 8, got {bits}")
    return _node(WXA16_MATMUL, [x, qweight, scales], [out], name, False, bits=int(bits), group_size=int(group_size))


Dim = Union[int, str]


def plugin_output_shapes(op: str, input_shapes: Sequence[Sequence[Dim]]) -> List[List[Dim]]:
    """Output shapes of a plugin node from its input shapes: the same rules the `@trtp.register`
    descriptors state (symbolic dims pass through)."""
    if op == RMS_NORM:
        return [list(input_shapes[0])]
    if op == ADD_RMS_NORM:
        return [list(input_shapes[0]), list(input_shapes[0])]
    if op == WXA16_MATMUL:
        x, qweight = input_shapes[0], input_shapes[1]
        return [list(x[:-1]) + [qweight[0]]]
    raise InputError(f"unknown plugin op {op!r}")


# ----------------------------------------------------------------------------------------------------------
# rewrite an onnxruntime LM graph into plugin nodes
# ----------------------------------------------------------------------------------------------------------
def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def to_plugin_graph(model, aot: bool = False):
    """A copy of `model` where SimplifiedLayerNormalization, com.microsoft::SkipSimplifiedLayerNormalization
    and com.microsoft::MatMulNBits (no zero points, no g_idx/bias) become our plugin nodes.

    MatMulNBits weights are converted to our packed layout (same nibble order: element 2i in the low nibble):
    4-bit B [N, G, gs/2] -> qweight [N, G*gs/2] uint8; 8-bit B (codes + 128) -> int8 codes [N, G*gs];
    flat scales [N*G] -> [N, G]. Anything else is left as it was (e.g. GroupQueryAttention, which no plugin
    of ours implements)."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, converted = [], {}
    for node in g.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx", "com.microsoft"):
            axis = _attr(node, "axis", -1)
            if axis != -1:
                raise ModelFileError(f"{node.name}: RMSNorm over axis {axis} (plugin normalizes the last axis)")
            new_nodes.append(rms_norm_node(node.input[0], node.input[1], node.output[0],
                                           _attr(node, "epsilon", 1e-5), node.name, aot))
        elif node.op_type == "SkipSimplifiedLayerNormalization" and node.domain == "com.microsoft":
            outs = list(node.output) + [""] * (4 - len(node.output))
            if outs[1] or outs[2] or len(node.input) > 3 and node.input[3]:
                raise ModelFileError(f"{node.name}: SkipSimplifiedLayerNormalization with mean/inv-std outputs "
                                     "or a bias has no plugin")
            out_sum = outs[3] or f"{node.name}_unused_sum"
            new_nodes.append(add_rms_norm_node(node.input[0], node.input[1], node.input[2], outs[0], out_sum,
                                               _attr(node, "epsilon", 1e-5), node.name))
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            if len(node.input) > 3 and any(node.input[3:]):
                raise ModelFileError(f"{node.name}: MatMulNBits with zero points / g_idx / bias has no plugin")
            bits, gs = _attr(node, "bits"), _attr(node, "block_size")
            n = _attr(node, "N")
            b_name, s_name = node.input[1], node.input[2]
            if b_name not in inits or s_name not in inits:
                raise ModelFileError(f"{node.name}: MatMulNBits weights must be initializers")
            if b_name not in converted:
                b = numpy_helper.to_array(inits[b_name])
                q = b.reshape(n, -1)
                if bits == 8:
                    q = (q.astype(np.int16) - 128).astype(np.int8)
                s = numpy_helper.to_array(inits[s_name]).reshape(n, -1)
                converted[b_name] = (f"{b_name}.edge_mmm", f"{s_name}.edge_mmm")
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q), converted[b_name][0]))
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(s), converted[b_name][1]))
            qn, sn = converted[b_name]
            new_nodes.append(wxa16_matmul_node(node.input[0], qn, sn, node.output[0], bits, gs, node.name))
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input} | _subgraph_inputs(g)
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def _subgraph_inputs(graph) -> set:
    import onnx

    names = set()
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= {i for n in a.g.node for i in n.input}
    return names


# ----------------------------------------------------------------------------------------------------------
# CPU reference implementations (onnx.reference) - the kernels' own torch references
# ----------------------------------------------------------------------------------------------------------
def reference_ops():
    """`new_ops` for `onnx.reference.ReferenceEvaluator`: our plugin nodes computed by the kernels' torch
    references, so a plugin graph can be checked on CPU against the graph it was rewritten from."""
    import torch
    from onnx.reference.op_run import OpRun

    from edge_mmm.kernels.quant_matmul import w4a16_matmul_reference, w8a16_matmul_reference
    from edge_mmm.kernels.rms_norm import rms_norm_reference

    class rms_norm(OpRun):  # noqa: N801 - named as the op
        op_domain = DOMAIN

        def _run(self, x, weight, eps=None, plugin_namespace=None, aot=None):
            y = rms_norm_reference(torch.from_numpy(x), torch.from_numpy(weight), float(eps))
            return (y.numpy(),)

    class add_rms_norm(OpRun):  # noqa: N801
        op_domain = DOMAIN

        def _run(self, x, residual, weight, eps=None, plugin_namespace=None, aot=None):
            y, h = rms_norm_reference(torch.from_numpy(x), torch.from_numpy(weight), float(eps),
                                      torch.from_numpy(residual))
            return y.numpy(), h.numpy()

    class wxa16_matmul(OpRun):  # noqa: N801
        op_domain = DOMAIN

        def _run(self, x, qweight, scales, bits=None, group_size=None, plugin_namespace=None, aot=None):
            fn = w4a16_matmul_reference if bits == 4 else w8a16_matmul_reference
            y = fn(torch.from_numpy(x), torch.from_numpy(qweight), torch.from_numpy(scales), None, int(group_size))
            return (y.numpy(),)

    return [rms_norm, add_rms_norm, wxa16_matmul]


# ----------------------------------------------------------------------------------------------------------
# the AOT kernel: our rms_norm kernel behind the argument order TensorRT's AOT plugins launch with
# (input pointers, extra int32 scalars, output pointers); eps and the block size are compile-time constants
# ----------------------------------------------------------------------------------------------------------
@jit
def _rms_norm_aot_kernel(X, W, n_cols, OUT, EPS: tl.constexpr, BLOCK: tl.constexpr):
    _rms_norm_kernel(X, X, W, OUT, OUT, n_cols, EPS, n_cols, n_cols, n_cols, n_cols,
                     HAS_RESIDUAL=False, BLOCK=BLOCK)


def rms_norm_aot_launch(x, weight, eps: float):
    """Run the AOT wrapper kernel through Triton (any device Triton runs on, including its CPU interpreter):
    the same kernel and arguments the AOT plugin compiles to PTX."""
    import torch

    from edge_mmm.kernels.dispatch import next_power_of_2

    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    out = torch.empty_like(x2)
    _rms_norm_aot_kernel[(x2.shape[0],)](x2, weight.contiguous(), n, out, EPS=float(eps), BLOCK=next_power_of_2(n))
    return out.view(x.shape)


def _compile_rms_norm_aot(dtype_str: str, eps: float, block: int):
    """(kernel name, PTX, num_warps, shared bytes) of the AOT wrapper for `dtype_str` (fp32|fp16)."""
    import inspect

    import triton

    fn = _rms_norm_aot_kernel.build()
    sig = {"X": f"*{dtype_str}", "W": f"*{dtype_str}", "n_cols": "i32", "OUT": f"*{dtype_str}",
           "EPS": "constexpr", "BLOCK": "constexpr"}
    consts = {"EPS": float(eps), "BLOCK": int(block)}
    params = inspect.signature(triton.compiler.ASTSource).parameters
    src = (triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts) if "constexprs" in params
           else triton.compiler.ASTSource(fn=fn, signature=sig, constants=consts))
    compiled = triton.compile(src)
    return compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps, compiled.metadata.shared


# ----------------------------------------------------------------------------------------------------------
# registration with TensorRT (needs tensorrt >= 10.6 and, to run, CUDA + triton)
# ----------------------------------------------------------------------------------------------------------
_registered = False


def _version(v: str) -> Tuple[int, int]:
    nums = [int(x) for x in re.findall(r"\d+", v)[:2]]
    return (nums + [0, 0])[0], (nums + [0, 0])[1]


def register_plugins() -> None:
    """Register our plugins with TensorRT's plugin registry (idempotent). Needed before parsing an ONNX
    with plugin nodes and before deserializing an engine that uses the JIT implementations."""
    global _registered
    if _registered:
        return
    trt = require("tensorrt", "trt", "TensorRT plugins of our Triton kernels")
    version = _version(trt.__version__)
    if version < QDP_MIN_VERSION:
        raise DeviceError(f"TensorRT {trt.__version__} has no tensorrt.plugin (Python plugins need TensorRT >= 10.6; "
                          "JetPack 6.x ships 10.3): build engines without plugin nodes, or install a newer TensorRT")
    import tensorrt.plugin as trtp

    _define(trt, trtp, aot=version >= AOT_MIN_VERSION)
    _registered = True


def _define(trt, trtp, aot: bool) -> None:
    import torch

    from edge_mmm.kernels.quant_matmul import w4a16_matmul, w8a16_matmul
    from edge_mmm.kernels.rms_norm import rms_norm

    @trtp.register(f"{NAMESPACE}::{RMS_NORM}")
    def _rms_norm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, eps: float) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(f"{NAMESPACE}::{RMS_NORM}")
    def _rms_norm_tune(x, weight, eps, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.impl(f"{NAMESPACE}::{RMS_NORM}")
    def _rms_norm_impl(x: trtp.Tensor, weight: trtp.Tensor, eps: float, outputs: Tuple[trtp.Tensor],
                       stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt, wt = torch.as_tensor(x, device="cuda"), torch.as_tensor(weight, device="cuda")
            torch.as_tensor(outputs[0], device="cuda").copy_(rms_norm(xt, wt, eps))

    if aot:
        @trtp.aot_impl(f"{NAMESPACE}::{RMS_NORM}")
        def _rms_norm_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, eps: float,
                          outputs: Tuple[trtp.TensorDesc], tactic: int):
            from edge_mmm.kernels.dispatch import next_power_of_2

            hidden = x.shape_expr[x.ndim - 1]
            if not hidden.is_constant:
                raise ModelFileError("rms_norm AOT plugin needs a static hidden size")
            n = int(hidden.constant_value())
            name, ptx, warps, shared = _compile_rms_norm_aot("fp32" if x.dtype == trt.float32 else "fp16",
                                                             eps, next_power_of_2(n))
            launch = trtp.KernelLaunchParams()
            launch.grid_x = x.shape_expr.numel() // n  # one program per row
            launch.block_x = warps * 32
            launch.shared_mem = shared
            return name.encode(), ptx.encode(), launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(n)])

    @trtp.register(f"{NAMESPACE}::{ADD_RMS_NORM}")
    def _add_rms_norm_desc(x: trtp.TensorDesc, residual: trtp.TensorDesc, weight: trtp.TensorDesc,
                           eps: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return x.like(), x.like()

    @trtp.autotune(f"{NAMESPACE}::{ADD_RMS_NORM}")
    def _add_rms_norm_tune(x, residual, weight, eps, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.impl(f"{NAMESPACE}::{ADD_RMS_NORM}")
    def _add_rms_norm_impl(x: trtp.Tensor, residual: trtp.Tensor, weight: trtp.Tensor, eps: float,
                           outputs: Tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            y, h = rms_norm(torch.as_tensor(x, device="cuda"), torch.as_tensor(weight, device="cuda"), eps,
                            torch.as_tensor(residual, device="cuda"))
            torch.as_tensor(outputs[0], device="cuda").copy_(y)
            torch.as_tensor(outputs[1], device="cuda").copy_(h)

    @trtp.register(f"{NAMESPACE}::{WXA16_MATMUL}")
    def _mm_desc(x: trtp.TensorDesc, qweight: trtp.TensorDesc, scales: trtp.TensorDesc, bits: int,
                 group_size: int) -> trtp.TensorDesc:
        out = x.like()
        out.shape_expr[x.ndim - 1] = qweight.shape_expr[0]
        return out

    @trtp.autotune(f"{NAMESPACE}::{WXA16_MATMUL}")
    def _mm_tune(x, qweight, scales, bits, group_size, outputs) -> List[trtp.AutoTuneCombination]:
        codes = "UINT8|UINT8" if bits == 4 else "INT8|INT8"
        return [trtp.AutoTuneCombination(f"FP32|FP16, {codes}, FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.impl(f"{NAMESPACE}::{WXA16_MATMUL}")
    def _mm_impl(x: trtp.Tensor, qweight: trtp.Tensor, scales: trtp.Tensor, bits: int, group_size: int,
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
        fn = w4a16_matmul if bits == 4 else w8a16_matmul
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            y = fn(torch.as_tensor(x, device="cuda"), torch.as_tensor(qweight, device="cuda"),
                   torch.as_tensor(scales, device="cuda"), None, group_size)
            torch.as_tensor(outputs[0], device="cuda").copy_(y)
