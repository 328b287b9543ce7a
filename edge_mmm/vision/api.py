"""`load_vlm`: a SmolVLM / Idefics3 model that answers questions about images.

`VisionLanguageModel.generate(messages, config)` takes OpenAI-style chat messages whose content parts are
`{"type": "text", "text": ...}`, `{"type": "image_url", "image_url": {"url": path | data URL}}` or
`{"type": "image", "image": path | PIL image | OpenCV BGR array}`. Image features go through an
`ImageEmbeddingCache`, so a second question about the same image skips the vision encoder. The vision
part runs on torch or onnxruntime (an ONNX export built once and cached); the LM on torch or, with
`lm_backend="onnxruntime"`, on onnxruntime (`edge_mmm.vision.lm_onnx`), with the shared generation loop of
`edge_mmm.text.generation`.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.text.generation import (Generation, GenerationConfig, TokenStream, cached_ids, check_prompt,
                                      common_prefix)
from edge_mmm.vision.embedding_cache import ImageEmbeddingCache, SourceEntry, content_key, pixels_key
from edge_mmm.vision.families import IDEFICS3, VLMFamily, vlm_family
from edge_mmm.vision.processor import ImageLike, ProcessedImages, load_image

BACKENDS = ("torch", "onnxruntime")
LM_BACKENDS = ("torch", "onnxruntime")
VLM_LM_KIND = "vlm-lm-onnx"
DEFAULT_CONTEXT = 8192
VISION_ONNX_VERSION = "vision-v2-mha"  # bump when the exported graph changes (v2: fused attention)
# onnxruntime vision precisions: (exporter precision, cached file, export-cache version). Both graphs run
# attention as onnxruntime's fused MultiHeadAttention (exporters/onnx_vision.py fuse_attention). int8 is the
# fp32 graph with int8 weight matmuls (quantize_int8_dynamic); auto is whichever of the two passed the int8
# check on this checkpoint (export_vision_auto), with its record (VISION_AUTO_RECORD). Each has its own cache
# key, so one entry is never taken for another. Bump the int8 suffixes when the quantization recipe changes,
# the auto one also when its check does.
VISION_PRECISIONS = {
    "auto": ("auto", "vision_auto.onnx", f"{VISION_ONNX_VERSION}-auto-rr1-check1"),
    "fp32": ("fp32", "vision_fp32.onnx", VISION_ONNX_VERSION),
    "int8": ("int8-dynamic", "vision_int8_dynamic.onnx", f"{VISION_ONNX_VERSION}-int8-dynamic-rr1"),
}
VISION_AUTO_RECORD = "vision_auto.json"  # auto's choice: precision, the int8 check's cosines, tiles, reason
Messages = Sequence[Mapping[str, Any]]


@dataclass
class PreparedPrompt:
    ids: List[int]
    features: Optional[torch.Tensor]  # (n_image_tokens, D), in prompt order
    timings: Dict[str, float]
    image_keys: List[str] = field(default_factory=list)  # content key of each image, in prompt order
    image_tokens: List[int] = field(default_factory=list)  # `<image>` tokens of each image


def _image_from_url(url: str) -> ImageLike:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not payload:
            raise InputError("image data URL must be base64 encoded (data:image/...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"image data URL is not valid base64: {exc}") from exc
    if url.startswith(("http://", "https://")):
        raise InputError(f"image URL {url}: remote images are not fetched; download it and pass a path")
    return url[len("file://"):] if url.startswith("file://") else url


def split_messages(messages: Messages) -> Tuple[List[Dict[str, Any]], List[ImageLike]]:
    """OpenAI-style messages -> (template messages with `{"type": "image"}` parts, images in order)."""
    if not messages:
        raise InputError("the conversation has no messages")
    out, images = [], []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise InputError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise InputError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, Mapping) else ref
                if not isinstance(url, str) or not url:
                    raise InputError("image_url part needs a url")
                images.append(_image_from_url(url))
                parts.append({"type": "image"})
            elif kind == "image":
                if part.get("image") is None:
                    raise InputError("image part needs an 'image' (path, PIL image or array)")
                images.append(part["image"])
                parts.append({"type": "image"})
            else:
                raise InputError(f"unsupported content part {part!r} (text, image_url, image)")
        out.append({"role": m["role"], "content": parts})
    return out, images


class VLMBackend:
    """The LM backend of one prompt: prefill splices the prompt's image features (`for_prompt`) in."""

    def __init__(self, model, context_length: int, features: Optional[torch.Tensor] = None):
        self.model = model
        self.context_length = context_length
        self.features = features

    def for_prompt(self, features: Optional[torch.Tensor]) -> "VLMBackend":
        """The backend that generates from a prompt whose image tokens take `features`."""
        return VLMBackend(self.model, self.context_length, features)

    def new_cache(self, max_len: Optional[int] = None):
        """A KV cache for `max_len` positions (default: the whole context)."""
        from edge_mmm.models.llama import KVCache

        dtype = next(self.model.lm.norm.parameters()).dtype
        n = self.context_length if max_len is None else min(max_len, self.context_length)
        return KVCache.for_config(self.model.config.text, n, dtype=dtype)

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], cache) -> torch.Tensor:
        """`ids` is the prompt after the reused prefix: its image tokens take the last features."""
        n_img = sum(1 for t in ids if t == self.model.config.image_token_id)
        feats = None if self.features is None or n_img == 0 else self.features[self.features.shape[0] - n_img:]
        emb = self.model.embed(torch.tensor([list(ids)], dtype=torch.long), feats)
        return self.model.lm(inputs_embeds=emb, cache=cache, last_only=True)[0, -1].float()

    @torch.inference_mode()
    def decode(self, token_id: int, cache) -> torch.Tensor:
        return self.model.lm(torch.tensor([[token_id]], dtype=torch.long), cache=cache)[0, -1].float()


class VisionLanguageModel:
    """Images + chat -> text. See the module docstring for the message format."""

    def __init__(self, model, files, encoder, context_length: int = DEFAULT_CONTEXT,
                 cache: Optional[ImageEmbeddingCache] = None, load_s: float = 0.0, model_id: str = "",
                 family: VLMFamily = IDEFICS3, lm_backend=None, vision_precision: Optional[str] = None):
        self.model = model
        self.files = files
        self.family = family
        self.tokenizer = files.tokenizer
        self.processor = family.processor(files)
        self.encoder = encoder
        # what the encoder runs: fp32 | int8 (onnxruntime export: what vision_precision="auto" chose), the torch
        # module's dtype (fp32, ...); None when unknown (a given ONNX file, a bundle's graph)
        self.vision_precision = vision_precision
        self.cache = cache if cache is not None else ImageEmbeddingCache()
        # the LM backend (`for_prompt` / `new_cache` / `prefill` / `decode`): torch, or OrtVLMBackend
        self.backend = lm_backend if lm_backend is not None else VLMBackend(
            model, min(context_length, model.config.text.max_position_embeddings))
        self.load_s = load_s
        self.model_id = model_id or str(files.root)
        self._source_tag = f"{self.model_id}|{files.image_processor!r}"  # same image, same settings
        self.reset()

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    def image_features(self, images: Sequence[ImageLike]
                       ) -> Tuple[torch.Tensor, ProcessedImages, Dict[str, float], List[str]]:
        """Decode, preprocess, encode, all through the embedding cache.

        Returns (features, processed, timings, per-image content keys). A decoded image set seen before
        skips preprocessing and the encoder; new pixels equal to cached preprocessed pixels skip the encoder.
        """
        t0 = time.perf_counter()
        decoded = [load_image(im) for im in images]
        keys = [content_key(self._source_tag, np.asarray(im)) for im in decoded]
        source = content_key("|".join(keys))
        known = self.cache.lookup_source(source)
        t1 = time.perf_counter()
        if known is not None:
            entry, feats = known
            processed = ProcessedImages(None, None, entry.rows, entry.cols)
            return feats, processed, {"preprocess_s": t1 - t0, "vision_s": 0.0, "image_cache_hit": 1.0,
                                      "image_tiles": float(feats.shape[0] // self.processor.image_seq_len)}, keys
        processed = self.processor.process_images(decoded)
        t2 = time.perf_counter()
        key = pixels_key(self.model_id, processed.pixel_values, processed.pixel_attention_mask)
        feats, hit = self.cache.get_or_compute(key, lambda: self.encoder.encode(
            torch.from_numpy(processed.pixel_values), torch.from_numpy(processed.pixel_attention_mask)))
        self.cache.remember_source(source, SourceEntry(key, processed.rows, processed.cols))
        t3 = time.perf_counter()
        return feats, processed, {"preprocess_s": t2 - t0, "vision_s": t3 - t2, "image_cache_hit": float(hit),
                                  "image_tiles": float(processed.pixel_values.shape[1])}, keys

    def prepare(self, messages: Messages) -> PreparedPrompt:
        """Messages -> token ids + image features, with preprocessing / vision timings."""
        tmpl_msgs, images = split_messages(messages)
        text = self.processor.apply_chat_template(tmpl_msgs, add_generation_prompt=True)
        timings: Dict[str, float] = {"preprocess_s": 0.0, "vision_s": 0.0}
        feats, processed, keys, counts = None, None, [], []
        if images:
            feats, processed, timings, keys = self.image_features(images)
            counts = [(r * c + 1 if r or c else 1) * self.processor.image_seq_len
                      for r, c in zip(processed.rows, processed.cols)]
        inputs = self.processor(images, text, processed=processed)
        return PreparedPrompt(inputs.input_ids[0].tolist(), feats, timings, keys, counts)

    def stream(self, messages: Union[Messages, PreparedPrompt], config: Optional[GenerationConfig] = None
               ) -> TokenStream:
        """Text deltas as decoded; `stream.result` is the `Generation` (its timings lack vision_s: pass a
        `prepare()`d prompt to time the vision part, as the live runtime does)."""
        prepared = messages if isinstance(messages, PreparedPrompt) else self.prepare(messages)
        return self._stream(prepared, config)

    def reset(self) -> None:
        """Forget the cached conversation KV (image features stay in the embedding cache)."""
        self._kv, self._kv_prompt, self._kv_images, self._last_stream = None, [], [], None

    def _reusable_prefix(self, prepared: PreparedPrompt) -> int:
        """How many leading positions of the KV cache are valid for this prompt: equal token ids, and
        every image whose tokens fall inside the prefix is the same image as last time."""
        if self._kv is None:
            return 0
        n = common_prefix(cached_ids(self._kv_prompt, self._last_stream, self._kv.length), prepared.ids)
        image_pos = [i for i, t in enumerate(prepared.ids) if t == self.model.config.image_token_id]
        start = 0
        for j, (key, count) in enumerate(zip(prepared.image_keys, prepared.image_tokens)):
            if start >= len(image_pos) or image_pos[start] >= n:
                break
            if j >= len(self._kv_images) or self._kv_images[j] != key:
                return min(n, image_pos[start])
            start += count
        return n

    def prefill_prefix(self, prepared: PreparedPrompt, n: int, room: int = 256) -> int:
        """Run the prefill of the prompt's first `n` tokens (image tokens included) ahead of time (the live
        runtime does it while the user speaks); a later prompt that starts the same way, with the same
        images, reuses them from the KV cache. `room`: positions kept free for what follows. Returns how
        many of the `n` were already cached."""
        n = min(n, len(prepared.ids))
        check_prompt(n + 1, self.context_length)
        reuse = min(self._reusable_prefix(prepared), n)
        reuse = self._ensure_kv(min(n + room, self.context_length), reuse)
        self._kv.truncate(reuse)
        ids = prepared.ids[:n]
        n_img = sum(1 for t in ids if t == self.model.config.image_token_id)
        feats = prepared.features[:n_img] if prepared.features is not None and n_img else None
        if reuse < n:
            self.backend.for_prompt(feats).prefill(ids[reuse:], self._kv)
        kept, start = [], 0  # the images whose tokens lie inside the prefix
        for key, count in zip(prepared.image_keys, prepared.image_tokens):
            if start + count > n_img:
                break
            kept.append(key)
            start += count
        self._kv_prompt, self._kv_images, self._last_stream = list(ids), kept, None
        return reuse

    def _ensure_kv(self, need: int, reuse: int) -> int:
        """A KV cache of at least `need` positions whose first `reuse` are kept; returns what was kept."""
        if self._kv is None or self._kv.max_len < need:
            old, self._kv = self._kv, self.backend.new_cache(need)
            if old is not None and reuse > 0:
                self._kv.copy_prefix_from(old, reuse)
            else:
                reuse = 0
        return reuse

    def _stream(self, prepared: PreparedPrompt, config: Optional[GenerationConfig]) -> TokenStream:
        config = config or GenerationConfig()
        config.validate()
        check_prompt(len(prepared.ids), self.context_length)
        reuse = self._reusable_prefix(prepared)
        # sized to this answer, grown on demand: SmolVLM's full 8k context would be ~380 MB
        reuse = self._ensure_kv(min(len(prepared.ids) + config.max_tokens, self.context_length), reuse)
        self._kv_prompt, self._kv_images = list(prepared.ids), list(prepared.image_keys)
        self._last_stream = TokenStream(self.backend.for_prompt(prepared.features), self.tokenizer, prepared.ids, config, self._kv,
                                        reuse=reuse, load_s=self.load_s)
        return self._last_stream

    def generate(self, messages: Messages, config: Optional[GenerationConfig] = None) -> Generation:
        """Answer the conversation. Timings: preprocess_s, vision_s, prefill_s, ttft_s (from the call),
        decode_tok_s, image_cache_hit, prompt_reused (KV positions reused from the previous call)."""
        t0 = time.perf_counter()
        prepared = self.prepare(messages)
        t_prep = time.perf_counter() - t0
        result = self._stream(prepared, config).consume()
        result.timings.update(prepared.timings)
        result.timings["ttft_s"] = t_prep + result.timings["ttft_s"]
        return result


def check_vision_precision(precision: str, backend: str) -> None:
    """InputError unless `precision` is a vision precision this `backend` runs (int8: onnxruntime only; auto
    is fp32 on torch)."""
    if precision not in VISION_PRECISIONS:
        raise InputError(f"unknown vision precision {precision!r}; choose one of: {', '.join(VISION_PRECISIONS)}")
    if precision == "int8" and backend != "onnxruntime":
        raise InputError(f"vision precision {precision} runs on the onnxruntime vision backend, not {backend!r} "
                         f"(--vlm-backend / --backend onnxruntime)")


def export_on_first_use(model, files, cache_root: Optional[Path], precision: str = "auto") -> Tuple[Path, str]:
    """The vision door into exporters: the cached, verified vision ONNX of this checkpoint in `precision`
    (auto | fp32 | int8, see VISION_PRECISIONS), written on first use, and the precision it runs (fp32 | int8).
    The checks run photo-like tiles through this checkpoint's image processor. int8 is checked against eager
    fp32 when built (mean cosine >= 0.999, else EdgeMMMError and nothing is cached); only the int8 file is
    kept. auto builds int8 and keeps it when every photo-like tile reaches cosine 0.999, else fp32, once per
    checkpoint: later loads read the choice from its record."""
    import json

    from edge_mmm.exporters.onnx_vision import export_vision, export_vision_auto
    from edge_mmm.weights.export_cache import cached_build, default_cache_root
    from edge_mmm.weights.hf_lm import safetensors_files

    check_vision_precision(precision, "onnxruntime")
    exporter_precision, name, version = VISION_PRECISIONS[precision]
    index = files.root / "model.safetensors.index.json"
    source = index if index.is_file() else safetensors_files(files.root)[0]

    def build(tmp: Path) -> None:
        import sys

        from edge_mmm.vision.processor import Idefics3ImageProcessor

        what = {"auto": "int8 where it keeps cosine 0.999 to fp32 on check tiles, else fp32"}.get(precision, precision)
        sys.stderr.write(f"exporting the vision encoder to ONNX ({what}; first use of these weights, cached for "
                         f"next time; ~20 s at SmolVLM-256M size on 2 cores)\n")
        normalize = Idefics3ImageProcessor(files.image_processor).normalize
        if exporter_precision == "auto":
            auto = export_vision_auto(model.vision, tmp, normalize)
            record = {"precision": "int8" if auto.precision == "int8-dynamic" else "fp32",
                      "int8_min_cosine": auto.int8.min_cosine, "int8_mean_cosine": auto.int8.cosine,
                      "tiles": auto.int8.tiles, "reason": auto.reason}
            (tmp / VISION_AUTO_RECORD).write_text(json.dumps(record, indent=1))
            return
        if exporter_precision == "fp32":
            export_vision(model.vision, tmp, "fp32", check=True, fused_attention=True, normalize=normalize)
            return
        import shutil

        work = tmp / "fp32"  # the fp32 graph the int8 one derives from, removed before the entry is sealed
        export_vision(model.vision, work, "fp32", check=False)
        export_vision(model.vision, tmp, exporter_precision, check=True, fp32_path=work / "vision_fp32.onnx",
                      fused_attention=True, normalize=normalize)
        shutil.rmtree(work)

    auto = precision == "auto"
    entry = cached_build(Path(cache_root) if cache_root else default_cache_root(), "vision-onnx", source,
                         version, build, [name, VISION_AUTO_RECORD] if auto else [name])
    return entry / name, json.loads((entry / VISION_AUTO_RECORD).read_text())["precision"] if auto else precision


def export_lm_on_first_use(model, files, cache_root: Optional[Path], quantize: Optional[str]) -> Tuple[Path, dict]:
    """The VLM's LM as the cached, verified ONNX graph that takes `inputs_embeds` (exporters/onnx_lm.py; the
    weights as `model.lm` holds them after `quantize`: MatMulNBits with fp32 activations, the head float),
    written on first use; with its io dict (layers, KV heads, head dim, vocabulary, max positions).
    `model.lm` is passed float: it is quantized (in place) only when the export is built, so a cache hit skips it."""
    import json

    from edge_mmm.exporters.versions import ONNX_LM
    from edge_mmm.weights.export_cache import cached_build, default_cache_root
    from edge_mmm.weights.hf_lm import safetensors_files

    index = files.root / "model.safetensors.index.json"
    source = index if index.is_file() else safetensors_files(files.root)[0]
    cfg = model.lm.config
    io = {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings}

    def build(tmp: Path) -> None:
        import sys

        from edge_mmm.exporters.onnx_lm import OnnxLMOptions, export_llama_onnx
        from edge_mmm.weights.idefics3 import quantize_vlm_lm

        sys.stderr.write(f"exporting the VLM's language model to ONNX ({quantize or 'float'} weights; first use, "
                         f"cached for next time)\n")
        quantize_vlm_lm(model, quantize)
        export_llama_onnx(model.lm, tmp / "model.onnx",
                          OnnxLMOptions(accuracy_level=0, head_bits=None, inputs_embeds=True))
        (tmp / "lm_io.json").write_text(json.dumps(io))

    version = f"{ONNX_LM}-embeds-{quantize or 'float'}-{next(model.lm.parameters()).dtype}".replace("torch.", "")
    entry = cached_build(Path(cache_root) if cache_root else default_cache_root(), VLM_LM_KIND, source, version,
                         build, ["model.onnx", "lm_io.json"], extra_sources=[files.root / "config.json"])
    return entry / "model.onnx", json.loads((entry / "lm_io.json").read_text())


def _onnx_lm_backend(model, files, cache_root: Optional[Path], quantize: Optional[str], context_length: int,
                     threads: int):
    from edge_mmm.vision.lm_onnx import OrtVLMBackend

    if next(model.lm.parameters()).dtype != torch.float32:
        raise InputError("lm_backend='onnxruntime' runs the VLM's LM in float32 (load it with dtype=torch.float32)")
    path, io = export_lm_on_first_use(model, files, cache_root, quantize)
    table = model.lm.embed_tokens.weight.detach().numpy()  # float32: a view, no copy
    return OrtVLMBackend.load(path, io, table, model.config.image_token_id, context_length, threads)


def _onnx_encoder(model, files, cache_root: Optional[Path], threads: int, precision: str):
    """The onnxruntime encoder of the cached export in `precision`, and the precision it runs (fp32 | int8)."""
    from edge_mmm.vision.backends import OrtVisionEncoder

    path, runs = export_on_first_use(model, files, cache_root, precision)
    return OrtVisionEncoder(path, patch_size=model.vision.patch_size, threads=threads), runs


def load_vlm(path_or_id: Union[str, Path], backend: str = "torch", quantize: Optional[str] = None,
             context_length: int = DEFAULT_CONTEXT, dtype: torch.dtype = torch.float32, threads: int = 0,
             cache: Optional[ImageEmbeddingCache] = None, onnx_cache_dir: Optional[Path] = None,
             vision_onnx: Optional[Path] = None, tile_batch: Optional[int] = None,
             vision_precision: str = "auto", lm_backend: str = "torch") -> VisionLanguageModel:
    """Load a SmolVLM/Idefics3 directory or cached HF repo id. `backend` picks the vision runtime
    (torch | onnxruntime: `vision_onnx`, or an export built once under `onnx_cache_dir`);
    `vision_precision` (the onnxruntime export): auto (default: int8 when this checkpoint's int8 graph keeps
    cosine >= 0.999 vs eager fp32 on every photo-like check tile, else fp32; decided and cached on first use;
    on torch the module's own precision, with `vision_onnx` that file as it is) | fp32 | int8 (int8 weight
    matmuls, attention fp32: 2.09x faster per 512-px tile on a 2-core AVX-512 VNNI CPU at cosine 0.9994 vs
    fp32, random weights; refused below mean cosine 0.999). The returned model's `vision_precision` says what
    runs. `quantize` (int4 | int8) applies weight-only quantization to the LM; `tile_batch` caps
    the image tiles per encoder call (a device profile's vision_batch; None: all tiles at once). `lm_backend`:
    where the LM runs, torch (default) or onnxruntime (the LM exported once with MatMulNBits for the quantized
    linears and fp32 activations, cached beside the vision export; same logits as torch within 1e-4 relative,
    ~3-4x faster decode on a CPU, docs/models.md)."""
    from edge_mmm.vision.backends import TorchVisionEncoder
    from edge_mmm.vision.families import FAMILIES, model_type
    from edge_mmm.weights.hub import resolve_model_path
    from edge_mmm.weights.idefics3 import REQUIRED_FILES

    if backend not in BACKENDS:
        raise InputError(f"unknown vision backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if lm_backend not in LM_BACKENDS:
        raise InputError(f"unknown VLM LM backend {lm_backend!r}; choose one of: {', '.join(LM_BACKENDS)}")
    if quantize not in (None, "int4", "int8"):
        raise InputError(f"unknown LM quantization {quantize!r}; choose int4, int8 or none")
    check_vision_precision(vision_precision, backend)
    if vision_precision != "auto" and vision_onnx is not None:
        raise InputError("vision_precision applies to the export built under onnx_cache_dir; vision_onnx names "
                         "a file that has its own precision (leave vision_precision auto)")
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    root = resolve_model_path(str(path_or_id), required=REQUIRED_FILES)
    family = vlm_family(root)
    if family is None:
        raise ModelFileError(f"{root / 'config.json'}: model_type {model_type(root)!r} is not a VLM family this "
                             f"package runs ({', '.join(FAMILIES)})")
    # an onnxruntime LM is quantized inside its export, built once: a load from the cache skips it (~0.4 s)
    model, files = family.load(root, dtype=dtype, quantize=None if lm_backend == "onnxruntime" else quantize)
    if backend == "onnxruntime" and vision_onnx is not None:
        from edge_mmm.vision.backends import OrtVisionEncoder

        encoder = OrtVisionEncoder(Path(vision_onnx), patch_size=model.vision.patch_size, threads=threads)
        runs = None  # the file's own precision
    elif backend == "onnxruntime":
        encoder, runs = _onnx_encoder(model, files, onnx_cache_dir, threads, vision_precision)
    else:
        encoder = TorchVisionEncoder(model.vision)
        runs = "fp32" if dtype == torch.float32 else str(dtype).replace("torch.", "")
    encoder.max_tiles = tile_batch
    lm = None
    if lm_backend == "onnxruntime":
        lm = _onnx_lm_backend(model, files, onnx_cache_dir, quantize, context_length, threads)
    release_replaced_weights(model, vision=backend == "onnxruntime", lm=lm is not None)
    return VisionLanguageModel(model, files, encoder, context_length, cache, time.perf_counter() - t0,
                               model_id=str(root), family=family, lm_backend=lm, vision_precision=runs)


def release_replaced_weights(model, vision: bool, lm: bool) -> None:
    """Free the torch weights that onnxruntime sessions replaced; the modules stay, on the meta device (as a
    bundle's vision tower does): the vision tower + connector (`vision`), and the LM's layers, norm and head
    (`lm`: its token table stays, the onnxruntime LM is fed its rows); then the freed heap goes back to the OS.
    SmolVLM-256M dims, int4 LM: the resident set after load + one answer is ~69 MiB lower (docs/models.md)."""
    if vision:
        model.vision.to("meta")
    if lm:
        table = {id(p) for p in model.lm.embed_tokens.parameters()}
        for name, child in model.lm.named_children():
            if name != "embed_tokens" and not any(id(p) in table for p in child.parameters()):
                child.to("meta")
    if vision or lm:
        from edge_mmm.weights.gguf_lm import release_heap

        release_heap()
