"""Vision encoder latency at SmolVLM-256M's real dimensions (random weights), torch vs onnxruntime,
FP32 and INT8 (onnxruntime: the graphs `load_vlm(backend="onnxruntime", vision_precision=...)` runs, attention
fused into onnxruntime's MultiHeadAttention (exporters/onnx_vision.py fuse_attention); int8 is
quantize_int8_dynamic: per-channel int8 weight MatMuls with reduce_range, attention fp32), the plain
(unfused) fp32 graph as the baseline `speedup_vs_ort_fp32` divides by, and the image-embedding cache hit.

    python benchmarks/vision.py [--threads 2] [--repeats 3] [--tiles 1]

Vision: SigLIP 12 layers, width 768, MLP 3072, 12 heads, patch 16, 512x512 tiles (1024 patches) ->
pixel shuffle x4 -> 64 tokens of width 576 per tile. A SmolVLM image is 1 tile without splitting, and up
to rows*cols+1 tiles with splitting (a 4:3 photo at the default longest_edge 2048 -> 4x3+1 = 13 tiles);
latency scales linearly with tiles, so per-tile numbers are measured and per-image ones derived.
Cache hit: a second question about the same photo file: decode + source hash + lookup (preprocessing and
encoder skipped); and the pixel-key path (preprocess + hash of the tiles) for a newly decoded image.
Accuracy of each runtime vs eager torch fp32: max abs error and mean cosine of the features.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

from edge_mmm.models.idefics3 import Idefics3Config, Idefics3Vision  # noqa: E402
from edge_mmm.models.llama import LlamaConfig  # noqa: E402
from edge_mmm.models.siglip import SiglipVisionConfig  # noqa: E402

SMOLVLM_256M = Idefics3Config(
    vision=SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=512, patch_size=16),
    text=LlamaConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3),
    scale_factor=4, image_token_id=49190)
TILES_PER_SPLIT_PHOTO = 13  # 4:3 photo, longest_edge 2048, 512 tiles: 4 x 3 + global


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiles", type=int, default=1, help="tiles per encoder call")
    ap.add_argument("--cache-only", action="store_true", help="only the cache-hit measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cache_only:
        row = bench_cache_hit(args.repeats)
        print_table([row], list(row))
        return
    torch.manual_seed(0)
    vision = Idefics3Vision(SMOLVLM_256M).eval()
    with torch.no_grad():  # random but LayerNorm-sane weights
        for name, p in vision.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    pv = torch.randn(args.tiles, 3, 512, 512)
    mask = torch.ones(args.tiles, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        ref = vision(pv, mask)

    from edge_mmm.exporters.onnx_vision import export_vision
    from edge_mmm.vision.backends import OrtVisionEncoder

    rows = []

    def add(runtime, precision, fn, out, s=None):
        s = _time(fn, args.repeats) if s is None else s
        cos = float(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1).mean())
        rows.append({"runtime": runtime, "precision": precision, "ms_per_tile": 1000 * s / args.tiles,
                     "ms_per_image_13tiles": 1000 * s / args.tiles * TILES_PER_SPLIT_PHOTO,
                     "max_abs_err": float((out - ref).abs().max()), "cosine": cos})
        print(rows[-1], flush=True)

    with torch.no_grad():
        add("torch", "fp32", lambda: vision(pv, mask), ref)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # what load_vlm(backend="onnxruntime") runs (attention fused into MultiHeadAttention), and the plain
        # fp32 graph it replaced (the "today's onnxruntime fp32", the baseline of the speed-ups)
        exports = {"fp32-unfused": export_vision(vision, Path(tmp) / "unfused", "fp32", check=False),
                   "fp32": export_vision(vision, Path(tmp) / "fused", "fp32", check=False, fused_attention=True),
                   "int8-dynamic": export_vision(vision, Path(tmp) / "fused", "int8-dynamic", check=False,
                                                 fused_attention=True)}
        export_s = time.perf_counter() - t0
        # timed in alternation, so a neighbour's load on a shared host falls on all alike; each speed-up is
        # the median of the per-round ratios to the unfused fp32 graph
        encs = {p: OrtVisionEncoder(ex.path, patch_size=16, threads=args.threads) for p, ex in exports.items()}
        outs = {p: enc(pv, mask) for p, enc in encs.items()}  # also the warm-up
        pairs = {p: [] for p in encs}
        for _ in range(args.repeats):
            for p, enc in encs.items():
                t1 = time.perf_counter()
                enc(pv, mask)
                pairs[p].append(time.perf_counter() - t1)
        for p in encs:
            add("onnxruntime", p, None, outs[p], statistics.median(pairs[p]))
        pair_speedup = {p: statistics.median(a / b for a, b in zip(pairs["fp32-unfused"], pairs[p])) for p in pairs}
        del encs
        qvision = _torch_int8(vision)
        if qvision is not None:
            with torch.no_grad():
                add("torch", "int8-dynamic", lambda: qvision(pv, mask), qvision(pv, mask))

    base = next(r["ms_per_tile"] for r in rows if r["runtime"] == "onnxruntime" and r["precision"] == "fp32-unfused")
    for r in rows:  # same run: the ratio is the comparable number across runs
        r["speedup_vs_ort_fp32"] = base / r["ms_per_tile"]
        if r["runtime"] == "onnxruntime":
            r["speedup_vs_ort_fp32"] = pair_speedup[r["precision"]]  # of the alternating rounds (above)
    cache_row = bench_cache_hit(args.repeats)
    print_table(rows, ["runtime", "precision", "ms_per_tile", "ms_per_image_13tiles", "speedup_vs_ort_fp32",
                       "max_abs_err", "cosine"])
    print()
    print_table([cache_row], list(cache_row))
    path = write_json("vision.json", {"machine": machine_info(), "loadavg_1_5_15": os.getloadavg(),
                                      "threads": args.threads, "tiles": args.tiles,
                                      "encoder": rows, "cache_hit": cache_row, "onnx_export_s": export_s,
                                      "ort_pairs_s": pairs,
                                      "config": "SmolVLM-256M vision (random weights)"})
    print(f"\nwrote {path}")


def _torch_int8(vision):
    """torch's own dynamic INT8 (qint8 Linear) when this torch still ships it, else None."""
    import copy

    try:
        with torch.no_grad():
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(vision), {torch.nn.Linear},
                                                          dtype=torch.qint8)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        print(f"torch dynamic int8 unavailable: {exc}")
        return None


def bench_cache_hit(repeats: int) -> dict:
    """A second question about the same photo, as `VisionLanguageModel.image_features` does it: decode +
    source hash + lookup (encoder and preprocessing skipped); also the cost of the pixel-key path
    (preprocess + pixel hash) taken when the decoded image is new."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from edge_mmm.vision.embedding_cache import ImageEmbeddingCache, SourceEntry, content_key, pixels_key
    from edge_mmm.vision.processor import Idefics3ImageProcessor, ImageProcessorConfig, load_image

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "coffee.jpg"  # 600x400 JPEG from disk, as `ask --image` reads it
        Image.fromarray(data.coffee()).save(photo, quality=95)
        for split in (False, True):
            cfg = ImageProcessorConfig(longest_edge=2048 if split else 512, max_image_size=512,
                                       do_image_splitting=split, image_seq_len=64)
            proc = Idefics3ImageProcessor(cfg)
            cache = ImageEmbeddingCache()
            processed = proc([photo])
            key = pixels_key("bench", processed.pixel_values, processed.pixel_attention_mask)
            cache.put(key, torch.zeros(processed.pixel_values.shape[1] * 64, 576))
            src = content_key(f"bench|{cfg!r}", np.asarray(load_image(photo)))
            cache.remember_source(src, SourceEntry(key, processed.rows, processed.cols))

            def source_hit():
                k = content_key(f"bench|{cfg!r}", np.asarray(load_image(photo)))
                assert cache.lookup_source(k) is not None

            def pixel_hit():
                p = proc([photo])
                assert cache.get(pixels_key("bench", p.pixel_values, p.pixel_attention_mask)) is not None

            tag = "split" if split else "nosplit"
            rows.update({f"{tag}_tiles": int(processed.pixel_values.shape[1]),
                         f"{tag}_source_hit_ms": 1000 * _time(source_hit, repeats),
                         f"{tag}_pixel_hit_ms": 1000 * _time(pixel_hit, repeats)})
    return rows


if __name__ == "__main__":
    main()
