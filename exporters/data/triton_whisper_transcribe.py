"""Triton Python-backend (BLS) model: greedy Whisper decoding over the `whisper_encoder` and
`whisper_decoder` ONNX models of the same repository (written by edge-mmm export --format triton-server).

Inputs: MEL [1, n_mels, 3000] fp32 (log-mel of one 30 s window), PROMPT_IDS [n] int64 (the start-of-transcript
sequence, e.g. <|startoftranscript|><|notimestamps|>), SUPPRESS_IDS [m] int64 (masked at every step),
BEGIN_SUPPRESS_IDS [k] int64 (masked at the first step: blank and end-of-text), MAX_NEW_TOKENS [1] int32.
Output: TOKEN_IDS [t] int64, the text tokens without the prompt and end-of-text (detokenize with the
tokenizer.json beside this model). The decoding rule is edge-mmm's greedy decode without timestamps.
"""

import json

import numpy as np

# Each model.py is loaded on its own by Triton's Python backend, so the two BLS models do not share a module.
try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: the decoding loop below stays importable and testable
    pb_utils = None


def greedy_transcribe(encode, decode, mel, prompt, suppress, begin_suppress, eot, max_new, n_layer, n_state,
                      n_ctx):
    """Token ids after `prompt`. `encode(mel) -> {cross_k_i, cross_v_i: arrays}`;
    `decode(tokens [1, n], offset, self_k, self_v, cross) -> (logits [1, n, vocab], self_k, self_v)`."""
    cross = encode(np.ascontiguousarray(mel, dtype=np.float32))
    self_k = np.zeros((n_layer, 1, 0, n_state), np.float32)
    self_v = np.zeros((n_layer, 1, 0, n_state), np.float32)
    suppress = np.asarray(suppress, dtype=np.int64)
    begin_suppress = np.asarray(begin_suppress, dtype=np.int64)
    new = np.asarray([list(prompt)], dtype=np.int64)
    offset, out = 0, []
    max_new = min(int(max_new), n_ctx - len(prompt))
    for i in range(max_new):
        logits, self_k, self_v = decode(new, offset, self_k, self_v, cross)
        offset += new.shape[1]
        last = np.array(logits[0, -1], dtype=np.float32)
        last[suppress] = -np.inf
        if i == 0:
            last[begin_suppress] = -np.inf
        token = int(last.argmax())
        if token == eot:
            break
        out.append(token)
        new = np.asarray([[token]], dtype=np.int64)
    return out


def _params(model_config):
    return {k: json.loads(v["string_value"]) for k, v in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    """Runs `greedy_transcribe` with BLS requests to the encoder and decoder models."""

    def initialize(self, args):
        p = _params(json.loads(args["model_config"]))
        self.eot, self.n_layer = int(p["eot"]), int(p["n_text_layer"])
        self.n_state, self.n_ctx = int(p["n_text_state"]), int(p["n_text_ctx"])
        self.encoder, self.decoder = p["encoder_model"], p["decoder_model"]
        self.cross_names = [f"cross_k_{i}" for i in range(self.n_layer)] + [
            f"cross_v_{i}" for i in range(self.n_layer)]

    def _infer(self, model, inputs, outputs):
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):  # results on the host: the loop runs in numpy
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=list(outputs),
                                            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()], **kwargs)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def _encode(self, mel):
        return self._infer(self.encoder, {"mel": mel}, self.cross_names)

    def _decode(self, tokens, offset, self_k, self_v, cross):
        out = self._infer(self.decoder, {"tokens": tokens, "offset": np.asarray([offset], np.int64),
                                         "self_k": self_k, "self_v": self_v, **cross},
                          ["logits", "new_self_k", "new_self_v"])
        return out["logits"], out["new_self_k"], out["new_self_v"]

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
            try:
                tokens = greedy_transcribe(self._encode, self._decode, get("MEL"), get("PROMPT_IDS").tolist(),
                                           get("SUPPRESS_IDS"), get("BEGIN_SUPPRESS_IDS"), self.eot,
                                           int(get("MAX_NEW_TOKENS").reshape(-1)[0]), self.n_layer, self.n_state,
                                           self.n_ctx)
                out = pb_utils.Tensor("TOKEN_IDS", np.asarray(tokens, dtype=np.int64))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
