"""Whisper with a short encoder input (whisper.cpp's audio_ctx): WER and pass time against the full 30 s window.

    python benchmarks/asr_audio_ctx.py [--threads 2] [--margins 0,50,150]

Every Whisper pass pads the audio to 30 s (3000 mel frames, 1500 encoder positions), however short the
utterance. Trimming the encoder input to the utterance plus a margin (the positional embedding sliced to
match, as whisper.cpp's `audio_ctx` does) makes the encoder and the decoder's cross-attention proportionally
cheaper, but the model was only trained on full windows. This measures what it costs in accuracy on held-out
speech: each espeak-ng sentence (edge_mmm.audio.synth.SENTENCES) in two voices the live tests do not use
(en-gb at 170 wpm, en-us at 130 wpm, pitch 40), 0.3 s of silence either side, torch backend (the ONNX encoder
export has a fixed 3000-frame input). Greedy, no temperature fallback, as the live runtime decodes.
Writes benchmarks/results/asr_audio_ctx.json.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime"))
from common import machine_info, print_table, write_json  # noqa: E402

VOICES = (("en-gb", 170, 40), ("en-us", 130, 40))


class TrimmedEncoder:
    """The torch backend with the encoder input cut to `frames` mel frames (None: the full window)."""

    def __init__(self, backend):
        self.backend = backend
        self.frames = None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode(self, mel):
        if self.frames is not None:
            mel = mel[..., :self.frames]
        return self.backend.encode(mel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--margins", default="0,50,150", help="encoder positions (20 ms each) added after the audio")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N sentences")
    args = ap.parse_args()

    from edge_mmm.asr.api import load_asr
    from edge_mmm.asr.transcribe import TranscribeOptions
    from edge_mmm.audio.constants import N_SAMPLES_PER_TOKEN, SAMPLE_RATE
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import SENTENCES, synthesize
    from wer import normalized_wer

    def normalize(s: str) -> str:
        return " ".join(re.sub(r"[^\w' ]", " ", s.lower()).split())

    asr = load_asr(backend="torch", threads=args.threads)
    trimmed = TrimmedEncoder(asr.backend)
    asr.backend = trimmed
    opts = TranscribeOptions(temperatures=(0.0,))
    margins = [int(m) for m in args.margins.split(",")]
    sentences = SENTENCES[:args.limit] if args.limit else SENTENCES
    tmp = Path(tempfile.mkdtemp(prefix="edge-mmm-audioctx-"))
    per = {"full": []} | {f"trim+{m}": [] for m in margins}
    for i, text in enumerate(sentences):
        for voice, speed, pitch in VOICES:
            wav = load_audio(synthesize(text, tmp / f"{i}-{voice}-{speed}.wav", voice, speed, pitch, 0.3, 0.3))
            n_pos = math.ceil(wav.size / N_SAMPLES_PER_TOKEN)
            for name in per:
                trimmed.frames = None if name == "full" else 2 * (n_pos + int(name.split("+")[1]))
                t0 = time.perf_counter()
                hyp = asr.transcribe(wav, opts).text
                dt = time.perf_counter() - t0
                per[name].append({"ref": text, "hyp": hyp, "wer": normalized_wer(text, hyp), "s": dt,
                                  "audio_s": wav.size / SAMPLE_RATE, "frames": trimmed.frames or 3000})
        print(f"{i + 1}/{len(sentences)}", file=sys.stderr)
    import jiwer

    rows = []
    for name, recs in per.items():
        corpus = jiwer.wer([normalize(r["ref"]) for r in recs], [normalize(r["hyp"]) for r in recs])
        rows.append({"encoder input": name, "clips": len(recs), "corpus_wer_%": round(100 * corpus, 2),
                     "clips_wrong": sum(r["wer"] > 0 for r in recs),
                     "median_pass_s": round(statistics.median(r["s"] for r in recs), 3),
                     "median_audio_s": round(statistics.median(r["audio_s"] for r in recs), 2),
                     "median_frames": statistics.median(r["frames"] for r in recs)})
    print_table(rows, list(rows[0]))
    path = write_json("asr_audio_ctx.json", {"machine": machine_info(), "args": vars(args), "summary": rows,
                                             "clips": per})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
