"""Triton Python-backend (BLS) model: greedy generation over the `lm` ONNX model (MatMulNBits + KV cache)
of the same repository (written by edge-mmm export --format triton-server).

Inputs: INPUT_IDS [n] int64 (the prompt, already rendered with the chat template and tokenized with the
tokenizer files beside this model), MAX_NEW_TOKENS [1] int32. Output: OUTPUT_IDS [t] int64, the new tokens
without the stop token. The KV cache goes round trip as `past_key_values.*` -> `present.*` each step.
"""

import json

import numpy as np

# Each model.py is loaded on its own by Triton's Python backend, so the two BLS models do not share a module.
try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: the generation loop below stays importable and testable
    pb_utils = None


def kv_names(num_layers):
    """(past input names, present output names) of the LM graph, in the same order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


def greedy_generate(step, input_ids, stop_ids, max_new, num_layers, num_kv_heads, head_dim, max_positions):
    """New token ids after `input_ids`. `step(input_ids [1, n], position_ids [1, n], past: {name: array})
    -> (logits [1, 1, vocab], present: {past name: array})`."""
    past_names, _ = kv_names(num_layers)
    past = {n: np.zeros((1, num_kv_heads, 0, head_dim), np.float32) for n in past_names}
    stops = {int(s) for s in stop_ids}
    new, pos, out = [int(t) for t in input_ids], 0, []
    for _ in range(int(max_new)):
        if pos + len(new) > max_positions:
            break
        ids = np.asarray([new], dtype=np.int64)
        positions = np.arange(pos, pos + len(new), dtype=np.int64)[None]
        logits, past = step(ids, positions, past)
        pos += len(new)
        token = int(np.asarray(logits)[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        new = [token]
    return out


def _params(model_config):
    return {k: json.loads(v["string_value"]) for k, v in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    """Runs `greedy_generate` with BLS requests to the LM model."""

    def initialize(self, args):
        p = _params(json.loads(args["model_config"]))
        self.lm = p["lm_model"]
        self.stop_ids = [int(s) for s in p["stop_ids"]]
        self.num_layers, self.num_kv_heads = int(p["num_layers"]), int(p["num_kv_heads"])
        self.head_dim, self.max_positions = int(p["head_dim"]), int(p["max_position_embeddings"])
        self.past_names, self.present_names = kv_names(self.num_layers)

    def _step(self, ids, positions, past):
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):  # results on the host: the loop runs in numpy
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        inputs = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("position_ids", positions)]
        inputs += [pb_utils.Tensor(n, past[n]) for n in self.past_names]
        request = pb_utils.InferenceRequest(model_name=self.lm, inputs=inputs,
                                            requested_output_names=["logits"] + self.present_names, **kwargs)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        get = lambda n: pb_utils.get_output_tensor_by_name(response, n).as_numpy()  # noqa: E731
        return get("logits"), {p: get(q) for p, q in zip(self.past_names, self.present_names)}

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
            try:
                tokens = greedy_generate(self._step, get("INPUT_IDS").reshape(-1).tolist(), self.stop_ids,
                                         int(get("MAX_NEW_TOKENS").reshape(-1)[0]), self.num_layers,
                                         self.num_kv_heads, self.head_dim, self.max_positions)
                out = pb_utils.Tensor("OUTPUT_IDS", np.asarray(tokens, dtype=np.int64))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
