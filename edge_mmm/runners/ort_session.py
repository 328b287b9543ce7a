"""The one place an onnxruntime session is made: thread and provider policy, typed load errors.

Policy: `threads` > 0 sets the intra-op pool (0 leaves onnxruntime's default, one thread per core);
the inter-op pool is 1 because every graph here runs sequentially; full graph optimization; the CPU
execution provider unless `providers` names others (CUDA / TensorRT EPs on a GPU machine); onnxruntime's
own log shows errors only (its warnings, e.g. on an initializer kept unpacked, are not the user's business).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

from edge_mmm.errors import ModelFileError

CPU_PROVIDERS = ("CPUExecutionProvider",)


def ort_session(path: Union[str, Path], what: str, threads: int = 0,
                providers: Optional[Sequence[str]] = None, inputs: Sequence[str] = (), spin_after_run: bool = True):
    """An `onnxruntime.InferenceSession` on `path`; a missing or unloadable file, or a graph without one of
    the `inputs` the caller feeds (a swapped file), is a ModelFileError naming `what` and the file.
    `spin_after_run` False: the intra-op workers spin while a run lasts but sleep as soon as it returns
    (onnxruntime's `session.force_spinning_stop`), so they do not take a core from the session that runs next:
    on 2 cores the Whisper encoder's spinning workers slowed the first decoder steps after it 2-3x."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} {path} is missing")
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spin_after_run:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        session = ort.InferenceSession(str(path), opts, providers=list(providers or CPU_PROVIDERS))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types, not exported
        raise ModelFileError(f"cannot load {what} {path}: {exc}") from exc
    check_onnx_inputs(session, inputs, path)
    return session


def check_onnx_inputs(session, names: Sequence[str], path) -> None:
    """ModelFileError when an onnxruntime session lacks an input the caller feeds (a swapped graph)."""
    have = {i.name for i in session.get_inputs()}
    missing = [n for n in names if n not in have]
    if missing:
        raise ModelFileError(f"{path} is not the expected graph: it has no input {missing[0]!r} "
                             f"(its inputs: {', '.join(sorted(have))[:200]})")


def keep_unpacked(graph, names: Sequence[str]) -> List[str]:
    """List the initializers `names` of an ONNX `graph` as graph inputs too (overridable initializers), so
    onnxruntime neither constant-folds nor prepacks them: a float matrix read by a Gather and a Gemm (a tied
    token embedding and output projection) then stays one copy in memory, where prepacking the Gemm's operand
    would add a second one of the same size. The cost: a Gemm with more than one row packs the operand on
    every call; one row (a decode step) reads it in place (MLAS's M=1 kernels). Returns the names added."""
    from onnx import helper

    have = {i.name for i in graph.input}
    inits = {i.name: i for i in graph.initializer}
    added = []
    for name in names:
        if name in inits and name not in have:
            init = inits[name]
            graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
            added.append(name)
    return added


def external_data_name(model_file: str) -> str:
    """The file beside an optimized graph that holds its initializers (`save_optimized_onnx`)."""
    return f"{model_file}.data"


def save_optimized_onnx(src: Union[str, Path], dst: Union[str, Path], what: str) -> None:
    """Write the graph at `src` as onnxruntime optimizes it to `dst`, its weights in a flat file beside it
    (`external_data_name`). A session on `dst` skips the fusions and the protobuf parse of the weights: the
    Whisper tiny graphs open in ~0.5 s instead of ~1.1 s on a 2-core x86. Level ORT_ENABLE_EXTENDED: its
    fusions hold on any CPU (ENABLE_ALL's layout transforms are machine-specific; a session still applies them
    on load). The file depends on the onnxruntime version: callers key their cache by it."""
    import onnxruntime as ort

    src, dst = Path(src), Path(dst)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                  external_data_name(dst.name))
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(src), opts, providers=list(CPU_PROVIDERS))
    except Exception as exc:  # onnxruntime's own Fail/InvalidGraph types, not exported
        raise ModelFileError(f"cannot optimize {what} {src}: {exc}") from exc
    if not dst.is_file():
        raise ModelFileError(f"onnxruntime wrote no optimized {what} to {dst}")
