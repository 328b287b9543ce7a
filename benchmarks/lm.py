"""LM speed on CPU: llama.cpp (llama-cpp-python) vs ours (our CPU kernel, onnxruntime, torch) on the same GGUF.

"ours CPU kernel (fp32, default)" is what `load_lm(backend="onnxruntime")` / `edge-mmm chat` run for a model
the kernel supports (edge_mmm/runners/cpu_lm.c); "ours onnxruntime (fp32)" is the same mode on
onnxruntime (the fallback without a C compiler).

Prefill: one ~200-token prompt (English text, same ids for every engine). Decode: 128 greedy tokens,
one token per call, argmax in Python for every engine (llama.cpp: `eval` + argmax of its logits).
Engines are interleaved for `--rounds` rounds and medians reported, because this machine is shared.
"ours torch (packed)" is the QuantLinear reference that dequantizes per call: only a few decode steps.

    python benchmarks/lm.py [--model GGUF] [--threads 2] [--rounds 3] [--prompt-tokens 200] [--new-tokens 128]
    python benchmarks/lm.py --llama-cpp-python /path/to/native-env/bin/python   # peer from another build
    python benchmarks/lm.py --parity   # token parity table vs llama.cpp (fp32 and llama.cpp numerics)

The llama.cpp build that ran is printed (`llama_print_system_info()`) and written to the JSON. Parity
uses the portable build the README pins; speed should be measured against the fastest build that runs on
the host (native flags, AMX off where it crashes) installed in a separate environment and passed with
`--llama-cpp-python` (it runs benchmarks/llama_cpp_peer.py there as a subprocess).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402
from quant_quality import english_text  # noqa: E402


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=512, verbose=False)

    def _argmax(self):
        # llama-cpp-python >= 0.3 no longer copies logits into `scores` unless logits_all: read them directly
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._argmax()

    def decode(self, tok):
        self.llm.eval([tok])
        return self._argmax()

    def window_logits(self, windows):
        from edge_mmm.text.quality import decode_logits

        def first(tok):
            self.llm.reset()
            return self.next(tok)

        return [decode_logits(first, self.next, w) for w in windows]

    def next(self, tok):
        self.llm.eval([tok])
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()


class LlamaCppProcess:
    """llama.cpp in another Python environment (benchmarks/llama_cpp_peer.py); timed inside that process."""

    name = "llama.cpp"

    def __init__(self, python, path, threads, n_ctx):
        peer = Path(__file__).resolve().parent / "llama_cpp_peer.py"
        self.proc = subprocess.Popen([str(python), str(peer)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.build = self._ask({"op": "info"})
        self.load_s = self._ask({"op": "load", "model": str(path), "threads": threads, "n_ctx": n_ctx})["load_s"]

    def _ask(self, req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp peer process exited (rc={self.proc.poll()})")
        return json.loads(line)

    def window_logits(self, windows):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "logits.npy"
            self._ask({"op": "logits", "windows": [list(map(int, w)) for w in windows], "out": str(path)})
            rows = np.load(path)
        return np.split(rows, np.cumsum([len(w) for w in windows])[:-1])

    def run(self, prompt, new_tokens):
        out = self._ask({"op": "run", "prompt": list(prompt), "new_tokens": new_tokens})
        return out["prefill_tok_s"], out["decode_tok_s"], out["ids"]


def llama_cpp_build_line(build) -> str:
    from edge_mmm.quant.llama_cpp_build import build_difference

    diff = build_difference(build["version"], build["system_info"])
    return (f"llama.cpp build: llama-cpp-python {build['version']} | {build['system_info']} | "
            + ("the pinned portable build (parity target)" if diff is None else "not the parity build"))


class Ours:
    def __init__(self, name, backend):
        self.name, self.backend, self.cache = name, backend, None

    def prefill(self, ids):
        self.cache = self.backend.new_cache()
        return int(self.backend.prefill(ids, self.cache).argmax())

    def decode(self, tok):
        return int(self.backend.decode(tok, self.cache).argmax())

    def window_logits(self, windows):
        from edge_mmm.text.quality import backend_decode_logits

        return backend_decode_logits(self.backend, windows)


@torch.inference_mode()
def float_window_logits(model, windows):
    """The float model's logits at every position of each window (one forward per window)."""
    return [model(torch.tensor([list(w)]))[0].float().numpy() for w in windows]


def quality(engines, float_model, windows):
    """{engine name: Agreement vs the float model} for every engine with `window_logits`."""
    from edge_mmm.text.quality import agreement

    t0 = time.perf_counter()
    ref = float_window_logits(float_model, windows)
    print(f"float reference: {sum(map(len, windows))} positions in {len(windows)} windows, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    out = {}
    for e in engines:
        t0 = time.perf_counter()
        out[e.name] = agreement(ref, e.window_logits(windows))
        print(f"quality {e.name}: top-1 {out[e.name].top1:.4f}, mean KL {out[e.name].mean_kl:.6f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def run_once(engine, prompt, new_tokens):
    if hasattr(engine, "run"):
        return engine.run(prompt, new_tokens)
    t0 = time.perf_counter()
    tok = engine.prefill(prompt)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens - 1):
        out.append(engine.decode(out[-1]))
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (new_tokens - 1) / (t2 - t1) if new_tokens > 1 else 0.0, out


def _prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _greedy(step_prefill, step_decode, prompt, n_new, stops):
    """Greedy ids and the logits before each of them (numpy rows)."""
    logits = step_prefill(prompt)
    ids, rows = [], []
    for _ in range(n_new):
        row = np.asarray(logits, dtype=np.float32)
        tok = int(row.argmax())
        rows.append(row)
        if tok in stops:
            break
        ids.append(tok)
        logits = step_decode(tok)
    return ids, rows


def parity(path, threads: int, n_new: int = 64, limit: int = 0) -> int:
    """Per chat prompt: greedy ids over `n_new` tokens of llama.cpp vs ours (fp32 default and
    numerics="llama.cpp"): matched prefix, whether logits are bit-identical, margins at a divergence."""
    import copy

    from llama_cpp import Llama

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "text"))
    from test_llama_cpp_parity import CHATS

    from edge_mmm.models.llama import Numerics
    from edge_mmm.text.api import dequantize_linears, load_model_files
    from edge_mmm.text.backends import TorchBackend

    torch.set_num_threads(1)
    packed, tok = load_model_files(path)
    fp32 = copy.deepcopy(packed)
    dequantize_linears(fp32)
    packed.set_numerics(Numerics.llama_cpp())
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    from edge_mmm.quant.llama_cpp_build import installed_build

    b = installed_build()
    build = {"version": b.version, "system_info": b.system_info}
    print(llama_cpp_build_line(build), flush=True)
    stops = set(tok.stop_token_ids)

    def lcpp_prefill(ids):
        llm.reset()
        llm.eval(ids)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

    def lcpp_decode(t):
        llm.eval([t])
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

    def torch_steps(model):
        backend = TorchBackend(model, 512)
        state = {}

        def pre(ids):
            state["cache"] = backend.new_cache()
            return backend.prefill(ids, state["cache"]).numpy()

        return pre, lambda t: backend.decode(t, state["cache"]).numpy()

    rows = []
    from edge_mmm.text.chat_template import render_chat

    for k, chat in enumerate(CHATS[:limit] if limit else CHATS):
        prompt = tok.encode(render_chat(tok.chat_template, chat, True, tok.special_tokens), add_special_tokens=False)
        ref_ids, ref_rows = _greedy(lcpp_prefill, lcpp_decode, prompt, n_new, stops)
        row = {"prompt": k, "prompt_tokens": len(prompt), "llama.cpp_tokens": len(ref_ids)}
        for name, model in (("fp32", fp32), ("llama.cpp numerics", packed)):
            t0 = time.perf_counter()
            ids, our_rows = _greedy(*torch_steps(model), prompt, n_new, stops)
            n = _prefix(ids, ref_ids)
            row[f"{name} matched"] = f"{n}/{len(ref_ids)}" + ("" if ids == ref_ids else " diverges")
            if name != "fp32":
                row["bit-identical logits"] = all(np.array_equal(a, b) for a, b in zip(our_rows, ref_rows))
                row["numerics s"] = round(time.perf_counter() - t0, 1)
            if ids != ref_ids and n < len(ref_rows) and n < len(our_rows):
                a, b = ref_rows[n], our_rows[n]
                top_a, top_b = np.argsort(-a)[:2], np.argsort(-b)[:2]
                row[f"{name} margin llama.cpp/ours"] = (f"{a[top_a[0]] - a[top_a[1]]:.3f}/"
                                                         f"{b[top_b[0]] - b[top_b[1]]:.3f}, "
                                                         f"top-2 has it: {int(top_a[0]) in top_b.tolist()}")
        print(row, flush=True)
        rows.append(row)
    print()
    columns = list(dict.fromkeys(c for r in rows for c in r))  # first-seen order
    print_table(rows, columns)
    print(llama_cpp_build_line(build))
    out = write_json("lm_parity.json", {"model": str(path), "new_tokens": n_new, "rows": rows,
                                        "llama_cpp_build": build,
                                        "machine": machine_info()})
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parity", action="store_true", help="token parity table vs llama.cpp instead of speed")
    ap.add_argument("--parity-prompts", type=int, default=0, help="only the first N parity prompts (0: all 11)")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--packed-new-tokens", type=int, default=4, help="decode steps for the packed torch path")
    ap.add_argument("--activations", default="mixed,int8,fp32",
                    help="onnx_activations mode per onnxruntime row (mixed: the default, int8 activations except "
                         "q|k|v; int8; fp32)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--quality-positions", type=int, default=1024,
                    help="positions of English text for the quality columns (top-1 / KL vs the float model; "
                         "teacher-forced decode); 0 skips them")
    ap.add_argument("--quality-window", type=int, default=256)
    ap.add_argument("--llama-cpp-python", type=Path, default=None,
                    help="python of another environment whose llama-cpp-python build is the speed peer "
                         "(default: llama_cpp imported here)")
    args = ap.parse_args(argv)
    if args.parity:
        from edge_mmm.text.api import default_lm_path

        return parity(args.model or default_lm_path(), args.threads, limit=args.parity_prompts)
    torch.set_num_threads(args.threads)

    from edge_mmm.text.api import default_lm_path, load_model_files
    from edge_mmm.text.backends import CpuBackend, TorchBackend
    from edge_mmm.text.backends import load_onnxruntime_backend

    path = args.model or default_lm_path()
    n_ctx = 1024
    engines, loads = [], {}
    for mode in args.activations.split(","):
        for kernel in ((True, False) if mode == "fp32" else (False,)):  # fp32: our CPU kernel, and onnxruntime
            t0 = time.perf_counter()  # includes the one-time export when the cache is cold
            ort_backend, tokenizer = load_onnxruntime_backend(path, n_ctx, threads=args.threads, cpu_kernel=kernel,
                                                              cache_root=args.cache_dir, activations=mode)
            name = ("ours CPU kernel (fp32, default)" if isinstance(ort_backend, CpuBackend)
                    else f"ours onnxruntime ({mode})")
            loads[name] = time.perf_counter() - t0
            engines.append(Ours(name, ort_backend))
    prompt = tokenizer.encode(english_text(), add_special_tokens=False)[:args.prompt_tokens]
    t0 = time.perf_counter()
    packed_model, _ = load_model_files(path)
    loads["ours torch (packed)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    float_model, _ = load_model_files(path, dequantize=True)
    loads["ours torch (dequantized fp32)"] = time.perf_counter() - t0
    engines.append(Ours("ours torch (dequantized fp32)", TorchBackend(float_model, n_ctx)))
    packed = Ours("ours torch (packed)", TorchBackend(packed_model, n_ctx))
    build = None
    if args.llama_cpp_python:
        peer = LlamaCppProcess(args.llama_cpp_python, path, args.threads, n_ctx)
        engines.insert(0, peer)
        loads["llama.cpp"], build = peer.load_s, peer.build
    else:
        try:
            from edge_mmm.quant.llama_cpp_build import installed_build

            t0 = time.perf_counter()
            engines.insert(0, LlamaCpp(path, args.threads, n_ctx))
            loads["llama.cpp"] = time.perf_counter() - t0
            b = installed_build()
            build = {"version": b.version, "system_info": b.system_info}
        except ImportError:
            print("llama-cpp-python is not installed: no llama.cpp row")
    if build:
        print(llama_cpp_build_line(build), flush=True)
    scores = {}
    if args.quality_positions:
        from edge_mmm.text.quality import text_windows

        windows = text_windows(tokenizer.encode(english_text(), add_special_tokens=False), args.quality_positions,
                               args.quality_window)
        scores = quality([e for e in engines if e.name != "ours torch (dequantized fp32)"], float_model, windows)

    results = {e.name: {"prefill": [], "decode": [], "ids": None} for e in engines + [packed]}
    for r in range(args.rounds):
        for e in engines:
            pf, dc, ids = run_once(e, prompt, args.new_tokens)
            results[e.name]["prefill"].append(pf)
            results[e.name]["decode"].append(dc)
            results[e.name]["ids"] = ids
            print(f"round {r}: {e.name}: prefill {pf:.1f} tok/s, decode {dc:.1f} tok/s")
    pf, dc, ids = run_once(packed, prompt, args.packed_new_tokens)
    results[packed.name].update(prefill=[pf], decode=[dc], ids=ids)

    ref = results.get("llama.cpp")
    torch_ids = results["ours torch (dequantized fp32)"]["ids"]
    rows = []
    for name, res in results.items():
        row = {"engine": name, "prefill_tok_s": statistics.median(res["prefill"]),
               "decode_tok_s": statistics.median(res["decode"]), "load_s": loads.get(name)}
        if ref is not None:
            row["prefill_vs_llama.cpp"] = row["prefill_tok_s"] / statistics.median(ref["prefill"])
            row["decode_vs_llama.cpp"] = row["decode_tok_s"] / statistics.median(ref["decode"])
            n = min(len(ref["ids"]), len(res["ids"]))
            same = next((i for i in range(n) if ref["ids"][i] != res["ids"][i]), n)
            row["ids_equal_llama.cpp_prefix"] = f"{same}/{len(res['ids'])}"
        if name in scores:
            row["top1_vs_float"], row["kl_vs_float"] = scores[name].top1, scores[name].mean_kl
        n = min(len(torch_ids), len(res["ids"]))
        row["ids_equal_torch_prefix"] = f"{next((i for i in range(n) if torch_ids[i] != res['ids'][i]), n)}/{n}"
        rows.append(row)
    print()
    if build:
        print(llama_cpp_build_line(build))
    print_table(rows, list(rows[0]))
    out = write_json("lm.json", {"model": str(path), "threads": args.threads, "rounds": args.rounds,
                                 "llama_cpp_build": build,
                                 "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                                 "activations": args.activations, "rows": rows,
                                 "quality": {"positions": args.quality_positions, "window": args.quality_window,
                                             "text": "Zen of Python + stdlib docstrings (benchmarks/quant_quality.py)",
                                             "reference": "the GGUF dequantized to float32, torch, full windows",
                                             "method": "teacher-forced decode, one token per call"},
                                 "raw": {k: {"prefill": v["prefill"], "decode": v["decode"]}
                                         for k, v in results.items()},
                                 "machine": machine_info()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
