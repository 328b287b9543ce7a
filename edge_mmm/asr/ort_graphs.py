"""Rewrites of the Whisper decoder graph for the onnxruntime CPU backend (`asr.api.onnxruntime_graphs` applies
them to the graphs it caches; the portable export that bundles copy is left as it is). Numpy and onnx only:
this runs where torch is not installed.

The token embedding is read by the embedding Gather and by the output projection (a Gemm with transB,
`exporters/onnx_whisper._share_tied_embedding`); onnxruntime would prepack a second copy for the Gemm
(n_vocab * d floats: 80 MB for tiny). `rewrite_tied_projection` stores the table transposed, [d, n_vocab],
makes the projection a MatMul on it and the embedding a Gather of its columns, and lists it as a graph
input (`keep_unpacked`), so it is in memory once. A decode step (one row) streams it with MLAS's M=1 kernel,
as fast as the prepacked copy (9.6 vs 11.2 ms per tiny.en step, same run); a step of several rows (the
prompt, best-of-5 sampling) packs it per call. The logits are fp32 as before (same tokens). Where edge-mmm's
C kernel builds, the decoder runs on it instead (`runners.cpu_whisper`); this graph is the fallback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
