"""A live Whisper pass with and without a draft: the previous pass's tokens checked in one decoder call.

    python benchmarks/asr_draft.py [--threads 2] [--repeats 3] [--lookback 1.0]

The live recognizer re-transcribes the growing utterance; its final pass covers the whole question, the pass
before it the audio up to `--lookback` seconds earlier (a partial arrives every second of new speech). For
each espeak-ng sentence (edge_mmm.audio.synth.SENTENCES, en-gb at 140 wpm, 0.3 s of silence either side) this
transcribes the shorter audio once (its tokens are the draft), then times the full pass without and with the
draft, alternating, best of `--repeats`, onnxruntime backend, greedy without fallback as the live runtime
decodes. The tokens must be identical (the script stops otherwise). Writes benchmarks/results/asr_draft.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lookback", type=float, default=1.0, help="seconds of audio the draft's pass had not heard")
    ap.add_argument("--limit", type=int, default=8, help="sentences")
    args = ap.parse_args()

    from edge_mmm.asr.api import load_asr
    from edge_mmm.asr.transcribe import TranscribeOptions
    from edge_mmm.audio.constants import SAMPLE_RATE
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import SENTENCES, synthesize

    asr = load_asr(threads=args.threads)
    opts = TranscribeOptions(temperatures=(0.0,))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, sentence in enumerate(SENTENCES[: args.limit]):
            audio = load_audio(synthesize(sentence, Path(tmp) / f"s{i}.wav", voice="en-gb", speed=140,
                                          lead_silence=0.3, trail_silence=0.3))
            draft = asr.transcribe(audio[: max(0, len(audio) - int(args.lookback * SAMPLE_RATE))], opts).tokens
            ref = asr.transcribe(audio, opts)  # warm-up
            plain, drafted = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a = asr.transcribe(audio, opts)
                t1 = time.perf_counter()
                b = asr.transcribe(audio, opts, draft=draft)
                t2 = time.perf_counter()
                if not a.tokens == b.tokens == ref.tokens:
                    sys.exit(f"tokens differ on {sentence!r}: {a.tokens} / {b.tokens}")
                plain.append(t1 - t0)
                drafted.append(t2 - t1)
            rows.append({"audio_s": round(len(audio) / SAMPLE_RATE, 2), "tokens": len(ref.tokens),
                         "draft_tokens": len(draft), "plain_ms": round(1e3 * min(plain), 1),
                         "draft_ms": round(1e3 * min(drafted), 1), "text": ref.text.strip()[:48]})
    print_table(rows, ["audio_s", "tokens", "draft_tokens", "plain_ms", "draft_ms", "text"])
    summary = {"median_plain_ms": statistics.median(r["plain_ms"] for r in rows),
               "median_draft_ms": statistics.median(r["draft_ms"] for r in rows)}
    print(f"median pass: {summary['median_plain_ms']:.0f} ms without a draft, {summary['median_draft_ms']:.0f} ms "
          f"with the previous pass's tokens ({len(rows)} sentences, tokens identical)")
    print("wrote", write_json("asr_draft", {"machine": machine_info(), "args": vars(args), "rows": rows,
                                            "summary": summary}))


if __name__ == "__main__":
    main()
