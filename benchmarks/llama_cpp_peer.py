"""llama.cpp as a benchmark peer in its own Python environment (a subprocess), so speed can be measured
against the fastest llama-cpp-python build that runs on the host (native flags) while the project's
environment keeps the portable build its parity tests need.

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"op": "info"}                                   -> {"version", "system_info"}
    {"op": "load", "model", "threads", "n_ctx"}      -> {"load_s"}
    {"op": "run", "prompt": [ids], "new_tokens": N}  -> {"prefill_tok_s", "decode_tok_s", "ids"}
    {"op": "logits", "windows": [[ids]], "out": PATH} -> {"positions"}; PATH: .npy [positions, vocab] float32,
                                                        teacher-forced decode, one token per eval, each
                                                        window from an empty cache
Needs only llama_cpp and numpy in that environment. Used by benchmarks/lm.py --llama-cpp-python PYTHON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> int:
    import llama_cpp

    llm = None

    def argmax():
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "info":
            info = llama_cpp.llama_print_system_info()
            out = {"version": llama_cpp.__version__,
                   "system_info": (info.decode() if isinstance(info, bytes) else str(info)).strip()}
        elif req["op"] == "load":
            t0 = time.perf_counter()
            llm = llama_cpp.Llama(model_path=req["model"], n_threads=req["threads"], n_threads_batch=req["threads"],
                                  n_ctx=req["n_ctx"], n_batch=512, verbose=False)
            out = {"load_s": time.perf_counter() - t0}
        elif req["op"] == "run":
            prompt, n = req["prompt"], req["new_tokens"]
            t0 = time.perf_counter()
            llm.reset()
            llm.eval(prompt)
            ids = [argmax()]
            t1 = time.perf_counter()
            for _ in range(n - 1):
                llm.eval([ids[-1]])
                ids.append(argmax())
            t2 = time.perf_counter()
            out = {"prefill_tok_s": len(prompt) / (t1 - t0),
                   "decode_tok_s": (n - 1) / (t2 - t1) if n > 1 else 0.0, "ids": ids}
        elif req["op"] == "logits":
            rows = []
            for window in req["windows"]:
                llm.reset()
                for tok in window:
                    llm.eval([tok])
                    rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
            np.save(req["out"], np.stack(rows).astype(np.float32))
            out = {"positions": len(rows)}
        else:
            out = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
