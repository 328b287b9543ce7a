"""Triton Python-backend (BLS, decoupled) model: greedy generation over an LM ONNX model (MatMulNBits + KV cache)
of the same repository, streaming one response per token (written by edge-mmm export --format triton-server).

Served twice: as `lm_generate` over the text LM `lm` (inputs INPUT_IDS or text_input, max_tokens), and as
`vlm_generate` over the VLM's language model `vlm_lm` (it takes `inputs_embeds`): the prompt's token embeddings
come from `vlm_embed`, and the image features from `vision_encoder` (inputs PIXEL_VALUES, PATCH_MASK: the
real tiles) replace the rows of the `<image>` tokens, as edge-mmm's Idefics3 does. Outputs per response:
text_output [1] BYTES (the text this token adds), OUTPUT_IDS [1] INT64; the stop token is not sent. An
answer that ends inside a multi-byte character gets one more response with the rest of the text and no ids.
The KV cache goes round trip as `past_key_values.*` -> `present.*` each step. Needs numpy and tokenizers.
"""

import json
import os

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


def generate_tokens(step, input_ids, stop_ids, max_new, num_layers, num_kv_heads, head_dim, max_positions):
    """Yields the new token ids after `input_ids`, one by one. `step(input_ids [1, n], position_ids [1, n],
    past: {name: array}) -> (logits [1, 1, vocab], present: {past name: array})`."""
    past_names, _ = kv_names(num_layers)
    past = {n: np.zeros((1, num_kv_heads, 0, head_dim), np.float32) for n in past_names}
    stops = {int(s) for s in stop_ids}
    new, pos = [int(t) for t in input_ids], 0
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
        yield token
        new = [token]


def greedy_generate(step, input_ids, stop_ids, max_new, num_layers, num_kv_heads, head_dim, max_positions):
    """All new token ids of `generate_tokens`, as a list."""
    return list(generate_tokens(step, input_ids, stop_ids, max_new, num_layers, num_kv_heads, head_dim,
                                max_positions))


class TextDeltas:
    """Incremental detokenization: `push(token)` -> the text the token adds (held back while the bytes so far
    end inside a multi-byte character)."""

    def __init__(self, decode):
        self.decode, self.ids, self.sent = decode, [], ""

    def push(self, token):
        self.ids.append(int(token))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self):
        """What the held-back bytes decode to at the end (replacement characters if they never completed)."""
        text = self.decode(self.ids)
        return text[len(self.sent):]


def _params(model_config):
    return {k: json.loads(v["string_value"]) for k, v in model_config.get("parameters", {}).items()}


def stream_response(text, tokens):
    """One streamed response: `text_output` [1] BYTES (the new text) + `OUTPUT_IDS` [k] INT64 (the new tokens)."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("OUTPUT_IDS", np.asarray(tokens, dtype=np.int64))])


def optional_input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


class TritonPythonModel:
    """Decoupled: each request runs `generate_tokens` on a worker thread (BLS requests to the LM model) and
    streams one response per token; the last response carries TRITONSERVER_RESPONSE_COMPLETE_FINAL.
    Inputs: INPUT_IDS [n] INT64 (prompt already templated + tokenized) or text_input [1] BYTES (raw text,
    tokenized here as is), max_tokens [1] INT32 (optional; default the `max_tokens` parameter)."""

    def initialize(self, args):
        from concurrent.futures import ThreadPoolExecutor

        from tokenizers import Tokenizer

        cfg = json.loads(args["model_config"])
        p = _params(cfg)
        self.lm = p["lm_model"]
        self.stop_ids = [int(s) for s in p["stop_ids"]]
        self.num_layers, self.num_kv_heads = int(p["num_layers"]), int(p["num_kv_heads"])
        self.head_dim, self.max_positions = int(p["head_dim"]), int(p["max_position_embeddings"])
        self.default_max = int(p["max_tokens"])
        self.past_names, self.present_names = kv_names(self.num_layers)
        self.tokenizer = Tokenizer.from_file(os.path.join(args["model_repository"], "tokenizer.json"))
        self.embed_model = p.get("embed_model")  # VLM: embeddings + vision encoder by BLS
        self.vision_model = p.get("vision_model")
        self.vision_output = p.get("vision_output", "image_features")
        self.vision_batch = int(p.get("vision_batch", 1))
        self.image_token_id = int(p.get("image_token_id", -1))
        self.pool = ThreadPoolExecutor(max_workers=int(p["max_concurrent"]), thread_name_prefix="lm_generate")

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

    def _infer(self, model, inputs, outputs):
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=list(outputs),
                                            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()], **kwargs)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]

    def _vlm_step(self, features):
        """A `step` for the VLM: embeddings from `vlm_embed`, image features spliced in at the prefill."""
        pending = [features]

        def step(ids, positions, past):
            (emb,) = self._infer(self.embed_model, {"input_ids": ids}, ["inputs_embeds"])
            emb = np.array(emb, dtype=np.float32)
            if pending:
                feats = pending.pop()
                where = ids[0] == self.image_token_id
                if int(where.sum()) != (0 if feats is None else feats.shape[0]):
                    raise ValueError(f"the prompt has {int(where.sum())} image tokens but the image gives "
                                     f"{0 if feats is None else feats.shape[0]} features")
                if feats is not None:
                    emb[0, where] = feats
            outs = self._infer(self.lm, {"inputs_embeds": emb, "position_ids": positions, **past},
                               ["logits"] + self.present_names)
            return outs[0], dict(zip(self.past_names, outs[1:]))

        return step

    def _features(self, request):
        pixels = optional_input(request, "PIXEL_VALUES")
        if pixels is None:
            return None
        mask = optional_input(request, "PATCH_MASK")
        if mask is None:
            raise ValueError("PIXEL_VALUES needs PATCH_MASK")
        # a batching vision encoder (max_batch_size = vision_batch > 1) takes at most that many tiles a request
        step = self.vision_batch if self.vision_batch > 1 else len(pixels)
        parts = [self._infer(self.vision_model, {"pixel_values": pixels[i:i + step], "patch_mask": mask[i:i + step]},
                             [self.vision_output])[0] for i in range(0, len(pixels), step)]
        return np.concatenate([np.asarray(f, dtype=np.float32).reshape(-1, f.shape[-1]) for f in parts])

    def _prompt(self, request):
        ids = optional_input(request, "INPUT_IDS")
        if ids is not None:
            return ids.reshape(-1).tolist()
        text = optional_input(request, "text_input")
        if text is None:
            raise ValueError("give INPUT_IDS (templated prompt ids) or text_input")
        raw = text.reshape(-1)[0]
        return self.tokenizer.encode(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw),
                                     add_special_tokens=False).ids

    def _generate(self, request, sender):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt = self._prompt(request)
            if not prompt:
                raise ValueError("the prompt is empty")
            limit = optional_input(request, "max_tokens")
            max_new = self.default_max if limit is None else int(limit.reshape(-1)[0])
            if max_new < 1:
                raise ValueError(f"max_tokens must be >= 1, got {max_new}")
            deltas = TextDeltas(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
            step = self._vlm_step(self._features(request)) if self.embed_model else self._step
            for token in generate_tokens(step, prompt, self.stop_ids, max_new, self.num_layers,
                                         self.num_kv_heads, self.head_dim, self.max_positions):
                sender.send(stream_response(deltas.push(token), [token]))
            rest = deltas.rest()
            if rest:  # an answer that ends inside a multi-byte character: its text as decoded, no new token
                sender.send(stream_response(rest, []))
            sender.send(flags=final)
        except Exception as exc:  # the error reaches the client as the stream's final response
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                        flags=final)

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._generate, request, request.get_response_sender())
        return None

    def finalize(self):
        self.pool.shutdown(wait=True)
