"""Print the planner's memory table for every device profile x VLM x Whisper size x context (markdown).

    python benchmarks/devices_table.py [--quant int4] [--json out.json]

Numbers are planner estimates (docs/devices.md explains the method and its CPU validation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_mmm.devices.planner import PlanRequest, plan
from edge_mmm.errors import DeviceError
from edge_mmm.devices.profile import MIB, list_profiles

VLMS = ("smolvlm-256m", "smolvlm-500m")
ASRS = ("tiny", "base", "small")
CONTEXTS = (2048, 8192)


def rows(quant: str):
    for prof in list_profiles():
        for vlm in VLMS:
            for asr in ASRS:
                for ctx in CONTEXTS:
                    try:
                        p = plan(PlanRequest(asr=asr, vlm=vlm, vad=True, quant=quant, context=ctx), prof)
                    except DeviceError:  # e.g. fp16 LM weights on the CPU profile
                        continue
                    parts = p.by_part()
                    yield {"device": prof.id, "vlm": vlm, "asr": asr, "context": ctx, "quant": quant,
                           **{f"{k}_mib": round(v / MIB, 1) for k, v in parts.items()},
                           "total_mib": round(p.total_bytes / MIB, 1), "usable_mib": round(p.budget_bytes / MIB),
                           "fits": p.fits}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4", choices=("int4", "int8", "fp16", "fp32"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    data = list(rows(args.quant))
    print("| device | VLM | ASR | ctx | weights | KV | activations | workspace | overhead | total MiB | usable MiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data:
        print(f"| {r['device']} | {r['vlm']} | {r['asr']} | {r['context']} | {r['weights_mib']:,.0f} | "
              f"{r['kv_cache_mib']:,.0f} | {r['activations_mib']:,.0f} | {r.get('workspace_mib', 0):,.0f} | "
              f"{r['overhead_mib']:,.0f} | {r['total_mib']:,.0f} | {r['usable_mib']:,} | "
              f"{'yes' if r['fits'] else '**no**'} |")
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
