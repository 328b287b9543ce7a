"""The VLM's language model: torch vs onnxruntime (`load_vlm(..., lm_backend=...)`), int4 and float weights.

One fresh process per configuration (so peak RSS is that configuration's): load a SmolVLM-256M-shaped random
Idefics3 (benchmarks/live.py's, built once under ~/.cache/edge-mmm/bench) with the onnxruntime vision encoder,
encode one 512-px photo, then `--rounds` times: reset the KV cache, answer one question with `--new-tokens`
greedy tokens. Medians of prefill seconds and decode tokens/s; exports are built by a first untimed load.

    python benchmarks/vlm_lm.py [--threads 2] [--rounds 3] [--new-tokens 48] [--vlm DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

CONFIGS = [("int4", "torch"), ("int4", "onnxruntime"), ("float", "torch"), ("float", "onnxruntime")]


def one(vlm_dir: str, quant: str, lm_backend: str, threads: int, rounds: int, new_tokens: int) -> dict:
    import resource
    import time

    import torch
    from PIL import Image
    from skimage import data

    from edge_mmm.text.generation import GenerationConfig
    from edge_mmm.vision.api import load_vlm

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    vlm = load_vlm(vlm_dir, backend="onnxruntime", quantize=None if quant == "float" else quant, threads=threads,
                   lm_backend=lm_backend)
    load_s = time.perf_counter() - t0
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(data.astronaut())},
                                         {"type": "text", "text": "What is in this picture?"}]}]
    vlm.generate(msgs, GenerationConfig(max_tokens=2))  # the image is encoded once, outside the timing
    runs = []
    for _ in range(rounds):
        vlm.reset()
        g = vlm.generate(msgs, GenerationConfig(max_tokens=new_tokens))
        runs.append(g.timings)
    return {"weights": quant, "lm_backend": lm_backend, "prompt_tokens": g.prompt_tokens,
            "load_s": round(load_s, 2),
            "prefill_s": round(statistics.median(r["prefill_s"] for r in runs), 3),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs), 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--vlm", type=Path, default=None, help="a SmolVLM/Idefics3 directory (default: the random one)")
    ap.add_argument("--one", nargs=2, metavar=("WEIGHTS", "LM_BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vlm is None:
        from live import build_vlm

        args.vlm = build_vlm(Path.home() / ".cache" / "edge-mmm" / "bench")
    if args.one:
        print(json.dumps(one(str(args.vlm), *args.one, args.threads, args.rounds, args.new_tokens)))
        return 0
    rows = []
    for quant, backend in CONFIGS:
        cmd = [sys.executable, __file__, "--vlm", str(args.vlm), "--threads", str(args.threads), "--rounds",
               str(args.rounds), "--new-tokens", str(args.new_tokens), "--one", quant, backend]
        subprocess.run(cmd[:-3] + ["--rounds", "1", "--new-tokens", "2", "--one", quant, backend],
                       check=True, capture_output=True)  # builds the exports untimed
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{quant} {backend}: {rows[-1]}", file=sys.stderr)
    for row in rows:
        ref = next(r for r in rows if r["weights"] == row["weights"] and r["lm_backend"] == "torch")
        row["decode_vs_torch"] = round(row["decode_tok_s"] / ref["decode_tok_s"], 2)
    print_table(rows, list(rows[0]))
    out = write_json("vlm_lm.json", {"machine": machine_info(), "vlm": str(args.vlm), "threads": args.threads,
                                     "rounds": args.rounds, "new_tokens": args.new_tokens, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
