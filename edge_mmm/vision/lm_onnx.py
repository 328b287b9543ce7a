"""The VLM's language model on onnxruntime (`load_vlm(..., lm_backend="onnxruntime")`).

The LM is exported once (`edge_mmm.vision.api.export_lm_on_first_use`: exporters/onnx_lm.py with
`inputs_embeds`, the weights as the torch model holds them: MatMulNBits for int4/int8, fp32 activations, the
head float) and fed embeddings computed here as `Idefics3ForConditionalGeneration.embed` computes them: rows of
the LM's token table, with the prompt's image features written over the `<image>` positions. The KV cache is
the text backend's `OrtKVCache` (GroupQueryAttention's shared past/present buffer), so prefix reuse and
truncation work as on torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edge_mmm.errors import InputError
from edge_mmm.runners.ort_session import ort_session
from edge_mmm.text.backends import OrtKVCache, check_room, run_cached


class OrtVLMBackend:
    """`new_cache` / `prefill` / `decode` (the LMBackend protocol) of one prompt; `for_prompt(features)` gives
    the backend whose image tokens take `features` ([n, hidden], torch or numpy)."""

    def __init__(self, session, io: dict, table: np.ndarray, image_token_id: int, context_length: int,
                 features: Optional[np.ndarray] = None):
        self.session, self.io, self.table = session, io, table
        self.image_token_id = image_token_id
        self.context_length = min(int(context_length), int(io["max_position_embeddings"]))
        self.features = features

    @classmethod
    def load(cls, onnx_path: Path, io: dict, table: np.ndarray, image_token_id: int, context_length: int,
             threads: int = 0) -> "OrtVLMBackend":
        session = ort_session(onnx_path, "ONNX VLM language model", threads, inputs=["inputs_embeds", "position_ids"] + [
            f"past_key_values.{i}.{kind}" for i in range(int(io["num_layers"])) for kind in ("key", "value")])
        return cls(session, io, table, image_token_id, context_length)

    def for_prompt(self, features) -> "OrtVLMBackend":
        if features is not None and not isinstance(features, np.ndarray):
            features = features.detach().float().cpu().numpy()  # the encoder's torch tensor
        return OrtVLMBackend(self.session, self.io, self.table, self.image_token_id, self.context_length, features)

    def new_cache(self, max_len: Optional[int] = None) -> OrtKVCache:
        io = self.io
        n = self.context_length if max_len is None else min(max_len, self.context_length)
        return OrtKVCache(self.session, io["num_layers"], io["num_kv_heads"], n, io["head_dim"], io["vocab_size"])

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """[1, len(ids), hidden] embeddings; the last image features in order at the image tokens (the prompt
        after a reused prefix holds the last images' tokens)."""
        ids = np.asarray(list(ids), dtype=np.int64)
        emb = self.table[ids]
        mask = ids == self.image_token_id
        n_img = int(mask.sum())
        if n_img:
            if self.features is None:
                raise InputError("the prompt has image tokens but no image was given")
            if n_img > self.features.shape[0]:
                raise InputError(f"the prompt has {n_img} image tokens but the images give "
                                 f"{self.features.shape[0]} features")
            emb[mask] = self.features[self.features.shape[0] - n_img:]
        return emb[None]

    def _run(self, ids: Sequence[int], cache: OrtKVCache) -> np.ndarray:
        check_room(cache, len(ids))
        return run_cached(self.session, cache, "inputs_embeds",
                          np.ascontiguousarray(self.embed(ids), dtype=np.float32))

    def prefill(self, ids: Sequence[int], cache: OrtKVCache) -> np.ndarray:
        """float32 logits of the last position; `ids` is the prompt after the reused prefix."""
        return self._run(list(ids), cache)

    def decode(self, token_id: int, cache: OrtKVCache) -> np.ndarray:
        return self._run([int(token_id)], cache)
