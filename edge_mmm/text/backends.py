"""The LM's backends, one `new_cache` / `prefill` / `decode` interface (edge_mmm.text.generation.LMBackend):

`TorchBackend`: the reference, a `Llama` module plus a preallocated `KVCache` on the model's device.
`OrtBackend`: onnxruntime on the exported graph (exporters/onnx_lm.py) with a preallocated KV cache.

The ONNX file is built once per model file and cached under `<cache>/onnx-lm/<sha256>-<version>/`
(edge_mmm.weights.export_cache: sha256 manifest verified on every load, rebuilt when stale or corrupt,
built in a temp dir and renamed into place). On a cache hit the torch model is never built.

The KV cache is one `[1, kv_heads, context, head_dim]` OrtValue per layer and per k/v, bound as both
`past_key_values.*` and `present.*` (GroupQueryAttention's shared-buffer mode): nothing is copied per
token, and truncating the cache to reuse a prefix only moves `length`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.runners.cpu_lm import PACK_BIN, PACK_JSON
from edge_mmm.runners.ort_session import ort_session

KIND = "onnx-lm"
ONNX_FILE = "model.onnx"
IO_FILE = "lm_io.json"  # the shapes the backend needs without building the torch model


def lm_io(cfg, accuracy_level: int) -> dict:
    """The contents of IO_FILE for an exported LM with config `cfg` (`accuracy_level`: the graph's main one;
    bundles check these keys, edge_mmm.bundle.LM_IO_SCHEMA)."""
    return {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
            "accuracy_level": accuracy_level}


# ------------------------------------------------------------------------------------------------ torch
# torch is imported where it runs: the onnxruntime path (numpy logits, greedy in numpy) never loads it.
def model_device(model):
    """Where `model`'s weights live (its first parameter or buffer; CPU for a model with neither)."""
    import torch

    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def prefill(model, ids: Sequence[int], cache):
    """Run the prompt through `model`, appending to `cache`; float32 logits of the last position (host)."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
        return model(ids, cache=cache, last_only=True)[0, -1].float().cpu()


def decode_one_token(model, token_id: int, cache):
    import torch

    with torch.inference_mode():
        ids = torch.tensor([[token_id]], dtype=torch.long, device=model_device(model))
        return model(ids, cache=cache)[0, -1].float().cpu()


class TorchBackend:
    """The reference backend: a `Llama` module plus a preallocated `KVCache` on the model's device (on CUDA
    the model's ops run our Triton kernels; logits come back to the host for sampling)."""

    def __init__(self, model, context_length: int):
        self.model = model
        self.context_length = context_length

    def new_cache(self):
        from edge_mmm.models.llama import KVCache

        return KVCache.for_config(self.model.config, self.context_length, dtype=self.model.cache_dtype,
                                  device=model_device(self.model))

    def prefill(self, ids: Sequence[int], cache):
        return prefill(self.model, ids, cache)

    def decode(self, token_id: int, cache):
        return decode_one_token(self.model, token_id, cache)


# ------------------------------------------------------------------------------------------ onnxruntime
class KVArrays:
    """Per-layer key/value arrays `[1, kv_heads, max_len, head_dim]` in `_arrays`; `length` positions are
    valid. Reusing a prefix only moves `length`."""

    max_len: int
    length: int
    _arrays: list

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions; later writes overwrite the rest."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n

    def copy_prefix_from(self, other: "KVArrays", n: int) -> None:
        """Take the first `n` positions of `other` (a smaller cache being grown); this cache then holds `n`."""
        if not 0 <= n <= min(other.length, self.max_len):
            raise ValueError(f"cannot copy {n} positions from a cache of length {other.length}")
        for mine, theirs in zip(self._arrays, other._arrays):
            mine[:, :, :n] = theirs[:, :, :n]
        self.length = n


class OrtKVCache(KVArrays):
    """Per-layer key/value OrtValues `[1, kv_heads, max_len, head_dim]` bound as onnxruntime's past and
    present; `length` positions are valid."""

    def __init__(self, session, num_layers: int, num_kv_heads: int, max_len: int, head_dim: int, vocab: int):
        import onnxruntime as ort

        self.max_len = max_len
        self.length = 0
        self.binding = session.io_binding()
        self._buffers, self._arrays = [], []  # an OrtValue made from a CPU numpy array shares its memory
        for i in range(num_layers):
            for kind in ("key", "value"):
                array = np.zeros((1, num_kv_heads, max_len, head_dim), np.float32)
                buf = ort.OrtValue.ortvalue_from_numpy(array)
                self._arrays.append(array)
                self._buffers.append(buf)
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        self.logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, vocab), np.float32))
        self.binding.bind_ortvalue_output("logits", self.logits)


def check_room(cache: OrtKVCache, n: int) -> None:
    """InputError unless `n` (> 0) more positions fit into `cache`."""
    if n == 0:
        raise InputError("no tokens to run")
    if cache.length + n > cache.max_len:
        raise InputError(f"KV cache overflow: position {cache.length + n} exceeds the context length {cache.max_len}")


def run_cached(session, cache: OrtKVCache, name: str, values: np.ndarray) -> np.ndarray:
    """One run of an exported LM that appends `values` ([1, n] ids or [1, n, hidden] embeddings, fed as
    input `name`) to `cache`; float32 logits of the last position."""
    start, n = cache.length, values.shape[1]
    b = cache.binding
    b.bind_cpu_input(name, values)
    b.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None])
    session.run_with_iobinding(b)
    cache.length = start + n
    return cache.logits.numpy()[0, -1].copy()


class OrtBackend:
    """`new_cache` / `prefill` / `decode` (the LMBackend protocol of edge_mmm.text.generation) over ORT."""

    def __init__(self, onnx_path: Path, io: dict, context_length: int, threads: int = 0):
        self.session = ort_session(onnx_path, "ONNX LM", threads, inputs=["input_ids", "position_ids"] + [
            f"past_key_values.{i}.{kind}" for i in range(int(io["num_layers"])) for kind in ("key", "value")])
        self.io = io
        self.context_length = min(int(context_length), int(io["max_position_embeddings"]))

    def new_cache(self) -> OrtKVCache:
        io = self.io
        return OrtKVCache(self.session, io["num_layers"], io["num_kv_heads"], self.context_length,
                          io["head_dim"], io["vocab_size"])

    def _run(self, ids: Sequence[int], cache: OrtKVCache) -> np.ndarray:
        check_room(cache, len(ids))
        return run_cached(self.session, cache, "input_ids", np.asarray([ids], dtype=np.int64))

    def prefill(self, ids: Sequence[int], cache: OrtKVCache) -> np.ndarray:
        """float32 logits of the last position (numpy: this path never imports torch)."""
        return self._run(list(ids), cache)

    def decode(self, token_id: int, cache: OrtKVCache) -> np.ndarray:
        return self._run([int(token_id)], cache)


# ------------------------------------------------------------------------------------- our CPU kernel
class CpuKVCache(KVArrays):
    """Per-layer key and value arrays `[1, kv_heads, max_len, head_dim]` for `CpuBackend`."""

    def __init__(self, num_layers: int, num_kv_heads: int, max_len: int, head_dim: int, vocab: int):
        self.max_len = max_len
        self.length = 0
        self.keys = [np.zeros((1, num_kv_heads, max_len, head_dim), np.float32) for _ in range(num_layers)]
        self.values = [np.zeros((1, num_kv_heads, max_len, head_dim), np.float32) for _ in range(num_layers)]
        self._arrays = self.keys + self.values
        self.logits = np.zeros(vocab, np.float32)


class CpuBackend:
    """The LMBackend protocol on edge-mmm's own C kernel (edge_mmm.runners.cpu_lm: fp32 arithmetic on the
    file's 4-bit blocks, logits equal to the float model's to fp32 rounding), prefill and decode; no
    onnxruntime session. A prompt runs in chunks of `PREFILL_CHUNK` tokens (bounded scratch memory)."""

    PREFILL_CHUNK = 256

    def __init__(self, kernel, io: dict, context_length: int):
        c = kernel.config
        pairs = [("num_layers", "layers"), ("num_kv_heads", "kv_heads"), ("head_dim", "head_dim"), ("vocab_size", "vocab")]
        if any(int(io[a]) != int(c[b]) for a, b in pairs):
            raise ValueError(f"the LM's shapes {[io[a] for a, _ in pairs]} differ from its CPU kernel pack's "
                             f"{[c[b] for _, b in pairs]}")
        self.kernel = kernel
        self.io = io
        self.context_length = min(int(context_length), int(io["max_position_embeddings"]), int(c["max_pos"]))

    def new_cache(self) -> CpuKVCache:
        io = self.io
        return CpuKVCache(io["num_layers"], io["num_kv_heads"], self.context_length, io["head_dim"], io["vocab_size"])

    def _run(self, ids: Sequence[int], cache: CpuKVCache) -> np.ndarray:
        check_room(cache, len(ids))
        vocab = int(self.io["vocab_size"])
        bad = [i for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        for start in range(0, len(ids), self.PREFILL_CHUNK):
            chunk = ids[start:start + self.PREFILL_CHUNK]
            self.kernel.forward(chunk, cache.length, cache.keys, cache.values, cache.logits)
            cache.length += len(chunk)
        return cache.logits.copy()

    def prefill(self, ids: Sequence[int], cache: CpuKVCache) -> np.ndarray:
        """float32 logits of the last position (numpy)."""
        return self._run([int(i) for i in ids], cache)

    def decode(self, token_id: int, cache: CpuKVCache) -> np.ndarray:
        return self._run([int(token_id)], cache)


def _source_and_digest(path: Path) -> Tuple[Path, str]:
    """The file `cached_build` hashes, and an extra digest for directory sources (every weight file)."""
    if path.is_file():
        return path, ""
    from edge_mmm.weights.export_cache import sha256_file

    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + sha256_file(f).encode())
    return path / "config.json", h.hexdigest()[:16]


def load_weights(path: Path):
    """The torch `Llama` of a GGUF file or HF directory (no tokenizer needed)."""
    from edge_mmm.models.llama import build_llama

    if path.is_file():
        from edge_mmm.weights.gguf_lm import load_gguf_lm

        cfg, state, _ = load_gguf_lm(path)
    else:
        from edge_mmm.weights.hf_lm import load_hf_lm

        cfg, state = load_hf_lm(path)
    return build_llama(cfg, state)


@dataclass(frozen=True)
class ActivationMode:
    """How the onnxruntime LM computes with 4-bit weights: `accuracy_level` of MatMulNBits (4: activations
    rounded to int8 per block of 32, as llama.cpp's Q8_1; 0: fp32), `fp32_linears` kept at fp32 anyway,
    whether a head that re-quantizes losslessly to INT8 (GGUF Q8_0) runs as INT8 (`int8_head`), and whether
    that INT8 head keeps fp32 activations (`exact_head`, OnnxLMOptions.exact_int8_head)."""

    accuracy_level: int
    fp32_linears: Tuple[str, ...] = ()
    int8_head: bool = False
    exact_head: bool = False
    key: str = ""  # the export cache's version suffix


# `fp32` (default): exact to the float model (greedy ids identical to torch; a GGUF Q8_0 head runs on the INT8
# kernel with its fp32 activations split into three int8 rows: 1.2x the decode speed of a float head, 85 MB
# less memory for SmolLM2, logits equal to fp32 rounding). `mixed`: int8 activations
# except the attention input projection (q|k|v), whose input (the RMSNorm output, with its outlier channels)
# loses the most to int8 rounding; measured on SmolLM2-135M Q4_1 over 3072 positions of English text: top-1
# vs the float model 0.9756 (llama.cpp 0.9632), mean KL 0.00336 (llama.cpp 0.00517), decode 1.07-1.24x
# llama.cpp's (docs/lm.md). `int8`: every 4-bit linear and the head, 1.1x llama.cpp, slightly below its
# fidelity. A float model has no 4-bit weights and runs fp32 in every mode but `int8`. With `fp32`, a model
# the CPU kernel runs does not use this graph at all (CpuBackend: 1.7x llama.cpp, the fastest mode).
ACTIVATIONS = {
    "fp32": ActivationMode(0, (), int8_head=True, exact_head=True, key="acc0-head3"),
    "mixed": ActivationMode(4, ("attn.qkv",), int8_head=True, key="acc4-qkv0"),
    "int8": ActivationMode(4, (), int8_head=True, key="acc4"),
}
DEFAULT_ACTIVATIONS = "fp32"


def activation_mode(name: str) -> ActivationMode:
    if name not in ACTIVATIONS:
        raise InputError(f"onnx_activations must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def export_on_first_use(model_path: Path, cache_root: Optional[Path] = None,
                        activations: str = DEFAULT_ACTIVATIONS) -> Tuple[Path, dict]:
    """The text door into exporters: the cached, verified ONNX export of a GGUF file or HF directory
    (written on first use, rebuilt if stale or corrupt) and its io dict."""
    from edge_mmm.exporters.versions import ONNX_LM as EXPORTER_VERSION
    from edge_mmm.weights.export_cache import cached_build, default_cache_root

    mode = activation_mode(activations)
    source, digest = _source_and_digest(Path(model_path))
    version = f"{EXPORTER_VERSION}-{mode.key}" + (f"-{digest}" if digest else "")

    def build(tmp: Path) -> None:
        from edge_mmm.exporters.cpu_lm_pack import write_cpu_lm_pack
        from edge_mmm.exporters.onnx_lm import OnnxLMOptions, export_llama_onnx, int8_head_is_lossless

        model = load_weights(Path(model_path))
        # int8 quantizes any head to INT8; fp32 and mixed only a head that INT8 holds exactly (GGUF Q8_0),
        # fp32 with its activations kept fp32 (exact_head); other heads stay float.
        if activations == "int8":
            head_bits = 8
        elif mode.int8_head:
            head_bits = 8 if int8_head_is_lossless(model) else None
        else:
            head_bits = None
        options = OnnxLMOptions(accuracy_level=mode.accuracy_level, head_bits=head_bits,
                                fp32_linears=mode.fp32_linears, exact_int8_head=mode.exact_head)
        cfg = model.config
        export_llama_onnx(model, tmp / ONNX_FILE, options)
        (tmp / IO_FILE).write_text(json.dumps(lm_io(cfg, mode.accuracy_level)))
        # the CPU LM kernel's weights (or why it cannot run this model); it runs the fp32 mode only
        write_cpu_lm_pack(model, tmp, None if activations == "fp32" else f"activations {activations!r} run on onnxruntime")

    entry = cached_build(Path(cache_root) if cache_root else default_cache_root(), KIND, source, version, build,
                         [ONNX_FILE, IO_FILE, PACK_JSON, PACK_BIN])
    return entry / ONNX_FILE, json.loads((entry / IO_FILE).read_text())


TOKENIZER_KIND = "lm-tokenizer"
TOKENIZER_VERSION = "tok-1"


def load_tokenizer(path: Path, cache_root: Optional[Path] = None):
    """(TextTokenizer, source file or directory) without loading weights. A GGUF's tokenizer is rebuilt from
    its metadata once and kept in the export cache (gguf-py parses a 49k-token vocabulary in seconds; the
    saved one loads in milliseconds), keyed and verified like the ONNX exports."""
    from edge_mmm.text.tokenizer import SAVED_FIELDS, TextTokenizer

    from edge_mmm.weights.gguf_lm import lm_source

    path = lm_source(path)
    if not path.is_file():
        return TextTokenizer.from_dir(path), path
    from edge_mmm.weights.export_cache import cached_build, default_cache_root
    from edge_mmm.weights.gguf_lm import gguf_summary

    def build(tmp: Path) -> None:
        TextTokenizer.from_gguf_metadata(gguf_summary(path)[0]).save(tmp)

    entry = cached_build(Path(cache_root) if cache_root else default_cache_root(), TOKENIZER_KIND, path,
                         TOKENIZER_VERSION, build, ["tokenizer.json", SAVED_FIELDS])
    return TextTokenizer.load_saved(entry), path


ORT_GRAPH_KIND = "onnx-lm-ort"


def onnxruntime_graph(onnx_path: Path, cache_root: Optional[Path] = None) -> Path:
    """The export as this onnxruntime optimizes it (`cached_onnxruntime_graphs`): a session opens it without
    parsing ~200 MB of protobuf weights (SmolLM2-135M: 0.8 s -> 0.4 s on a 2-core x86)."""
    from edge_mmm.weights.export_cache import cached_onnxruntime_graphs

    return cached_onnxruntime_graphs([onnx_path], ORT_GRAPH_KIND, cache_root) / ONNX_FILE


def load_onnxruntime_backend(path: Path, context_length: int, threads: int = 0, cache_root: Optional[Path] = None,
                             activations: str = DEFAULT_ACTIVATIONS, cpu_kernel: bool = True):
    """(backend, TextTokenizer) for a model file or directory; exports on first use. With fp32 activations (the
    default) and a model edge-mmm's own CPU kernel runs (4-bit linears in blocks of 32, a GGUF Q8_0 head:
    `cpu_lm`), the backend is `CpuBackend`; else, or with `cpu_kernel=False`, `OrtBackend`."""
    activation_mode(activations)  # a bad name fails before the tokenizer is built
    tokenizer, source = load_tokenizer(Path(path), cache_root)
    onnx_path, io = export_on_first_use(source, cache_root, activations)
    kernel = cpu_lm(onnx_path.parent, cache_root, threads) if cpu_kernel and activations == "fp32" else None
    if kernel is not None:
        return CpuBackend(kernel, io, context_length), tokenizer
    return OrtBackend(onnxruntime_graph(onnx_path, cache_root), io, context_length, threads), tokenizer


def cpu_lm(entry: Path, cache_root: Optional[Path] = None, threads: int = 0):
    """edge-mmm's own CPU kernel for the export in `entry` (its `cpu_lm.*` pack), or None when the model is
    not one it runs or the kernel cannot be built here (`runners.cpu_lm.host_library`: no C compiler, an
    unknown CPU family, `EDGE_MMM_CPU_KERNEL=0`); onnxruntime runs the model then."""
    from edge_mmm.runners.cpu_lm import CpuLM, host_library, read_pack
    from edge_mmm.weights.export_cache import default_cache_root

    config, arrays, reason = read_pack(entry / PACK_JSON, entry / PACK_BIN)
    if config is None:
        return None  # a model the kernel does not run (the pack says why): onnxruntime decodes, as designed
    lib = host_library(Path(cache_root) if cache_root else default_cache_root())
    if lib is None:
        return None
    return CpuLM(lib, lib.edge_lm_isa().decode(), config, arrays, threads)
