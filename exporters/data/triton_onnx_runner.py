"""Triton Python-backend model: one ONNX graph (`1/model.onnx` beside this file) run by onnxruntime inside the
Python backend, for servers that have only the Python backend (nvidia-pytriton's tritonserver, a CPU build).
Written by `edge-mmm export --format triton-server --triton-backend python`; the same graph is served under the
`onnxruntime_onnx` platform otherwise. Inputs and outputs are the graph's own (config.pbtxt lists them).

Config parameters (JSON strings): `intra_op_threads` (0 = onnxruntime's default), `batched` (true when the
config has max_batch_size > 0: requests stacked by Triton's dynamic batcher are concatenated on axis 0 here,
run once and split back by each request's batch size).
The stub's interpreter needs numpy (< 2: the stub's pybind11 reads numpy 1.x arrays) and onnxruntime.
"""

import json
import os

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: importable for checks
    pb_utils = None


def _params(model_config):
    return {k: json.loads(v["string_value"]) for k, v in model_config.get("parameters", {}).items()}


def _dims(t):
    """The shape a model sees of a config tensor: `reshape` when present, else `dims`."""
    shape = t.get("reshape", {}).get("shape") if "reshape" in t else None
    return [int(d) for d in (shape if shape is not None else t.get("dims", []))]


def check_config(cfg, session, path, batched):
    """The config's inputs/outputs must be the graph's: same names, same rank, equal static dims (-1 in the
    config or a symbolic dim in the graph matches anything). A mismatch fails the model's load, naming both."""
    for kind, declared, actual in (("input", cfg.get("input", []), session.get_inputs()),
                                   ("output", cfg.get("output", []), session.get_outputs())):
        graph = {a.name: a.shape for a in actual}
        names = [t["name"] for t in declared]
        if sorted(names) != sorted(graph) and (kind == "input" or not set(names) <= set(graph)):
            raise ValueError(f"config.pbtxt {kind}s {sorted(names)} are not the {kind}s of {path}: {sorted(graph)}")
        for t in declared:
            dims = ([-1] if batched else []) + _dims(t)
            shape = graph[t["name"]]
            agree = len(dims) == len(shape) and all(
                d == -1 or not isinstance(g, int) or g == d for d, g in zip(dims, shape))
            if not agree:
                raise ValueError(f"config.pbtxt {kind} '{t['name']}' has dims {dims} but {path} declares "
                                 f"{[g if isinstance(g, int) else -1 for g in shape]}")


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        p = _params(cfg)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        if int(p.get("intra_op_threads", 0)) > 0:
            opts.intra_op_num_threads = int(p["intra_op_threads"])
        # A load error (missing file, bad graph) raises here: Triton marks the model UNAVAILABLE with this text.
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batched = bool(p.get("batched", False))
        check_config(cfg, self.session, path, self.batched)

    def _run(self, feeds, wanted):
        return dict(zip(wanted, self.session.run(wanted, feeds)))

    def execute(self, requests):
        get = pb_utils.get_input_tensor_by_name
        if self.batched and len(requests) > 1:
            try:
                parts = [{n: get(r, n).as_numpy() for n in self.inputs} for r in requests]
                sizes = [p[self.inputs[0]].shape[0] for p in parts]
                feeds = {n: np.concatenate([p[n] for p in parts]) for n in self.inputs}
                out = self._run(feeds, self.outputs)
            except Exception as exc:
                err = pb_utils.TritonError(f"onnxruntime: {exc}")
                return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
            responses, start = [], 0
            for r, n in zip(requests, sizes):
                wanted = r.requested_output_names() or self.outputs
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(k, np.ascontiguousarray(out[k][start:start + n])) for k in wanted]))
                start += n
            return responses
        responses = []
        for r in requests:
            try:
                wanted = list(r.requested_output_names()) or self.outputs
                out = self._run({n: get(r, n).as_numpy() for n in self.inputs}, wanted)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()]))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(output_tensors=[],
                                                            error=pb_utils.TritonError(f"onnxruntime: {exc}")))
        return responses
