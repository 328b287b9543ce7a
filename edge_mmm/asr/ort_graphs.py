"""Rewrites of the Whisper decoder graph for the onnxruntime CPU backend (`asr.api.onnxruntime_graphs` applies
them to the graphs it caches; the portable export that bundles copy is left as it is). Numpy and onnx only:
this runs where torch is not installed.

The token embedding is read by the embedding Gather and by the output projection (a Gemm with transB,
`exporters/onnx_whisper._share_tied_embedding`); onnxruntime would prepack a second copy for the Gemm
(n_vocab * d floats: 80 MB for tiny). `rewrite_tied_projection` stores the table transposed, [d, n_vocab],
makes the projection a MatMul on it and the embedding a Gather of its columns, and lists it as a graph
input (`keep_unpacked`), so it is in memory once. A decode step (one row) streams it with MLAS's M=1 kernel,
as fast as the prepacked copy (9.6 vs 11.2 ms per tiny.en step, same run); a step of several rows (the
prompt, best-of-5 sampling) packs it per call. The logits are fp32 as before (same tokens).

`write_decoder_trunk` writes a second decoder beside it for edge-mmm's C kernel (`runners.cpu_lm.CpuHead`):
the same graph without the token table, which takes the token embeddings as an input and returns the final
layer norm's output; the table is stored apart (`DECODER_TABLE`), in fp16 when every value is one (the
checkpoints' own precision: openai-whisper and CTranslate2 files store fp16), and the C kernel computes the
logits from it in fp32: the float model's logits from 40 MB per step instead of 80 MB (tiny).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DECODER_TRUNK = "decoder_trunk.onnx"  # the decoder up to its final layer norm: token_embeds in, hidden out
DECODER_TABLE = "decoder_table.bin"  # its token table, [n_vocab, d] raw little-endian, dtype in DECODER_HEAD
DECODER_HEAD = "decoder_head.json"  # {"format", "dtype", "vocab", "dim"}
HEAD_FORMAT = 1


def _tied_nodes(graph):
    """(the token embedding Gather, the projection Gemm that reads the same table with transB) or None."""
    from onnx import helper

    inits = {i.name for i in graph.initializer}
    gathers = {n.input[0]: n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits}

    def plain_transposed(node) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return (len(node.input) == 2 and attrs.get("transB") == 1 and not attrs.get("transA")
                and attrs.get("alpha", 1.0) == 1.0)

    gemm = next((n for n in graph.node if n.op_type == "Gemm" and n.input[1] in gathers and plain_transposed(n)), None)
    return None if gemm is None else (gathers[gemm.input[1]], gemm)


def write_decoder_trunk(decoder: Path) -> bool:
    """Write `DECODER_TRUNK` (+ its weights file), `DECODER_TABLE` and `DECODER_HEAD` beside the decoder graph
    at `decoder` (the optimized one in the export cache, the portable one in a CPU bundle; see the module
    doc). False when the graph has no tied projection."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_mmm.runners.ort_session import external_data_name

    proto = onnx.load(str(decoder))
    graph = proto.graph
    tied = _tied_nodes(graph)
    if tied is None:
        return False
    gather, gemm = tied
    table = numpy_helper.to_array(next(i for i in graph.initializer if i.name == gemm.input[1]))
    hidden = gemm.input[0]
    keep_outputs = [o for o in graph.output if o.name != "logits"]
    # the embedding rows come from the caller: every reader of the Gather's output reads the new input
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == gather.output[0]:
                node.input[i] = "token_embeds"
    needed = {hidden, *(o.name for o in keep_outputs)}
    live = []
    for node in reversed(list(graph.node)):  # graph nodes are in topological order
        if node is not gather and any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()
    live.append(helper.make_node("Identity", [hidden], ["hidden"], name="trunk_hidden"))
    del graph.node[:]
    graph.node.extend(live)
    used = {i for n in live for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    for inp in [i for i in graph.input if i.name not in used]:
        graph.input.remove(inp)
    graph.input.append(helper.make_tensor_value_info("token_embeds", TensorProto.FLOAT,
                                                     ["batch", "new", int(table.shape[1])]))
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", int(table.shape[1])]),
                         *keep_outputs])
    trunk = decoder.parent / DECODER_TRUNK
    onnx.save(proto, str(trunk), save_as_external_data=True, all_tensors_to_one_file=True,
              location=external_data_name(trunk.name), size_threshold=1024)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(trunk.parent / external_data_name(trunk.name), 0o666 & ~umask)  # onnx writes it 0600; a bundle ships it
    half = table.astype(np.float16)
    exact = bool(np.array_equal(half.astype(np.float32), table))
    stored = half if exact else np.ascontiguousarray(table, dtype=np.float32)
    stored.astype(stored.dtype.newbyteorder("<")).tofile(decoder.parent / DECODER_TABLE)
    (decoder.parent / DECODER_HEAD).write_text(json.dumps(
        {"format": HEAD_FORMAT, "dtype": "float16" if exact else "float32", "vocab": int(table.shape[0]),
         "dim": int(table.shape[1])}))
    return True


def read_decoder_head(onnx_dir: Path):
    """The token table `write_decoder_trunk` stored in `onnx_dir` ([vocab, dim] float16/float32), or
    None when there is none; ValueError when the files disagree."""
    meta_path = Path(onnx_dir) / DECODER_HEAD
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT \
            or meta.get("dtype") not in ("float16", "float32"):
        raise ValueError(f"{meta_path}: not a decoder head of format {HEAD_FORMAT}")
    vocab, dim = meta.get("vocab"), meta.get("dim")
    if not all(isinstance(v, int) and 0 < v <= 1 << 20 for v in (vocab, dim)):
        raise ValueError(f"{meta_path}: bad sizes {vocab!r} x {dim!r}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    table = np.fromfile(Path(onnx_dir) / DECODER_TABLE, dtype=dtype)
    if table.size != vocab * dim:
        raise ValueError(f"{Path(onnx_dir) / DECODER_TABLE}: {table.size} values, expected {vocab} x {dim}")
    return table.reshape(vocab, dim).astype(dtype.newbyteorder("="), copy=False)


def rewrite_tied_projection(decoder: Path) -> bool:
    """Rewrite the decoder graph at `decoder` (weights in the file beside it, as `save_optimized_onnx`
    writes them). False when the graph has no tied projection (nothing written)."""
    import onnx
    from onnx import helper, numpy_helper

    from edge_mmm.runners.ort_session import external_data_name, keep_unpacked

    proto = onnx.load(str(decoder))  # weights included (read from the file beside it)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    tied = _tied_nodes(graph)
    if tied is None:
        return False
    gather, gemm = tied
    name = gemm.input[1]
    table_t = f"{name}_t"
    cols = f"{gather.output[0]}_cols"
    nodes = []
    for node in graph.node:
        if node is gather:
            nodes += [helper.make_node("Gather", [table_t, gather.input[1]], [cols], name=gather.name, axis=1),
                      helper.make_node("Transpose", [cols], list(gather.output), name=f"{gather.name}_rows",
                                       perm=[1, 2, 0])]
        elif node is gemm:
            nodes.append(helper.make_node("MatMul", [gemm.input[0], table_t], list(gemm.output), name=gemm.name))
        else:
            nodes.append(node)
    table = numpy_helper.to_array(inits[name])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.remove(inits[name])
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), table_t))
    keep_unpacked(graph, [table_t])
    data = decoder.parent / external_data_name(decoder.name)
    data.unlink()  # onnx.save appends to an existing data file
    onnx.save(proto, str(decoder), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)
    return True
