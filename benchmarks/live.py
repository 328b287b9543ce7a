"""Live runtime latency: end of speech -> first answer token, and where the time goes, over N spoken turns.

    python benchmarks/live.py [--turns 10] [--threads 2] [--max-tokens 24] [--vlm DIR] [--skip-vlm] [--skip-text]
                              [--vlm-backend torch|onnxruntime] [--vision-precision auto|fp32|int8]
                              [--vlm-lm-backend torch|onnxruntime]
                              [--end-silence-ms 500] [--sentence-end-silence-ms MS] [--no-baseline] [--speak]

Each turn is an espeak-ng sentence (edge_mmm.audio.synth.SENTENCES) followed by 1 s of silence, pushed into
`LiveAssistant.feed_audio` in real time (32 ms blocks), so VAD, streaming Whisper and the answer run as
they would on a microphone. One conversation per configuration:

  text  cached     SmolLM2-135M-Instruct Q4_1 GGUF (onnxruntime), the conversation's KV cache reused
  text  no-cache   the same turns, the LM's KV cache dropped before each turn (full prefill: the peer)
  vlm   cached     a SmolVLM-256M-shaped Idefics3 (random weights: real compute, meaningless text; or --vlm
                   DIR for real weights), one 512x512 camera view (no image splitting) with sensor noise each
                   turn: turn 1 encodes the image, later turns reuse its embedding and the KV cache
  vlm   no-cache   the same, with the image-embedding cache and the KV cache cleared before each turn
Each runs as a pipeline (work during speech: frame encoded and prefix prefilled at speech start, final
Whisper pass and question prefill at the pause); "sequential" rows (skip with --no-baseline) run the cached
configurations again with `LiveConfig(speculate=False)`: every stage after the VAD end, as before.

Per turn (from the `timing` event): endpoint_s (end of speech -> VAD end: the end-silence wait),
asr_wait_s (VAD end -> final text: 0 when the pass at the pause was reused), asr_final_s (the final
Whisper pass, wherever it ran), spec_vision_s / spec_prefill_s (vision encoder / prefill done during
speech), vision_s, prefill_s (at the turn), ttft_s (turn start -> first token), eos_to_first_token_s (end of
speech -> first token). Medians are printed; the JSON in benchmarks/results/live.json keeps every turn.

--speak: every configuration speaks its answers (espeak-ng into a real-time RecordingSink, see
benchmarks/live_speak.py) and gets a `first_audio_s` column: end of speech -> first answer sample played,
taken from the played blocks; the next question waits until the answer has been heard.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402
from live_speak import make_speaker, wait_spoken  # noqa: E402

COLUMNS = ["config", "turns", "eos_to_first_token_s", "endpoint_s", "asr_wait_s", "asr_final_s", "asr_reused",
           "spec_vision_s", "spec_prefill_s", "vision_s", "prefill_s", "ttft_s", "decode_tok_s", "prompt_tokens",
           "prompt_reused"]
BLOCK = 512  # samples per feed (32 ms)


def spoken_turns(n: int, out: Path):
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import SENTENCES, synthesize

    clips = []
    for i in range(n):
        path = synthesize(SENTENCES[i % len(SENTENCES)], out / f"turn{i:02d}.wav", lead_silence=0.3,
                          trail_silence=1.0)
        clips.append(load_audio(path))
    return clips


def camera_view(size: int = 512) -> np.ndarray:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((size, size))
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


def run_conversation(assistant, clips, frame, before_turn=None, timeout=300.0):
    """Speak each clip in real time; return the turn timing records (+ first_audio_s with a speaker)."""
    q = assistant.subscribe(maxsize=100_000)
    rng = np.random.default_rng(0)
    records = []
    assistant.start()
    try:
        for i, clip in enumerate(clips):
            if before_turn is not None:
                before_turn()
            if frame is not None:
                noisy = np.clip(frame.astype(np.int16) + rng.integers(-3, 4, frame.shape), 0, 255)
                assistant.feed_frame(noisy.astype(np.uint8))
            t0 = time.monotonic()
            for j in range(0, clip.size, BLOCK):
                due = t0 + (j + BLOCK) / 16000
                time.sleep(max(0.0, due - time.monotonic()))
                assistant.feed_audio(clip[j:j + BLOCK])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    e = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if e.type == "timing" and e.data.get("stage") == "turn":
                    records.append(dict(e.data, turn_index=i))
                    break
                if e.type == "error":
                    print(f"  error: {e.data}", file=sys.stderr)
            else:
                raise RuntimeError(f"turn {i} got no answer within {timeout} s")
            if assistant.voice is not None:
                records[-1].update(wait_spoken(assistant, q, records[-1]["turn"], timeout))
            assistant.wait_idle(timeout)
    finally:
        assistant.stop(timeout=5.0)
    return records


def summarize(name: str, records):
    row = {"config": name, "turns": len(records)}
    for c in COLUMNS[2:]:
        vals = [r[c] for r in records if r.get(c) is not None]
        if vals and isinstance(vals[0], bool):  # a share of the turns
            row[c] = sum(vals) / len(vals)
        else:
            row[c] = statistics.median(vals) if vals else None
    return row


def build_vlm(cache: Path) -> Path:
    """A SmolVLM-256M-shaped random Idefics3 (tests/tiny_idefics3.py, real_dims), image splitting off."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_idefics3 import build_tiny_vlm

    out = cache / "smolvlm256m-shaped-random-nosplit"
    if not (out / "config.json").is_file():
        tmp = cache / f".tmp-{time.time_ns()}"
        build_tiny_vlm(tmp, seed=0, real_dims=True, splitting=False)
        tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--vlm", type=Path, default=None, help="SmolVLM/Idefics3 directory (default: random, real dims)")
    ap.add_argument("--skip-vlm", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--vlm-backend", default="torch", choices=["torch", "onnxruntime"],
                    help="vision encoder runtime (load_vlm backend)")
    ap.add_argument("--vlm-lm-backend", default="torch", choices=["torch", "onnxruntime"],
                    help="where the VLM's language model runs (load_vlm lm_backend)")
    ap.add_argument("--vision-precision", default="auto", choices=["auto", "fp32", "int8"],
                    help="onnxruntime vision encoder precision (load_vlm's; auto: int8 where its check passes)")
    ap.add_argument("--end-silence-ms", type=int, default=500)
    ap.add_argument("--sentence-end-silence-ms", type=int, default=None,
                    help="LiveConfig.sentence_end_silence_ms: the early endpoint for finished sentences "
                         "(default: LiveConfig's, 300; 0: off)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the sequential (speculate=False) rows")
    ap.add_argument("--no-interrupt-partials", action="store_true",
                    help="let a partial Whisper pass running at a pause finish (LiveConfig.interrupt_partial_after_s=None)")
    ap.add_argument("--speak", action="store_true", help="speak the answers; adds the first_audio_s column")
    args = ap.parse_args()
    if args.speak:
        COLUMNS.insert(3, "first_audio_s")
    speaker = make_speaker if args.speak else lambda: None

    from edge_mmm.asr.api import load_asr
    from edge_mmm.runtime.assistant import LiveAssistant, LiveConfig, LiveModels
    from edge_mmm.text.api import load_lm

    cfg = LiveConfig(max_tokens=args.max_tokens, threads=args.threads, end_silence_ms=args.end_silence_ms,
                     sentence_end_silence_ms=(LiveConfig.sentence_end_silence_ms if args.sentence_end_silence_ms is None
                                              else args.sentence_end_silence_ms or None),
                     interrupt_partial_after_s=None if args.no_interrupt_partials else LiveConfig.interrupt_partial_after_s)
    sequential = LiveConfig(max_tokens=args.max_tokens, threads=args.threads, end_silence_ms=args.end_silence_ms,
                            speculate=False)
    baseline = () if args.no_baseline else (("sequential", sequential),)
    tmp = Path(tempfile.mkdtemp(prefix="edge-mmm-live-"))
    clips = spoken_turns(args.turns, tmp)
    asr = load_asr(threads=args.threads)
    rows, detail = [], {}

    lm = load_lm(backend="onnxruntime", threads=args.threads)
    models = LiveModels(asr, lm)
    text_runs = () if args.skip_text else (("text cached", None, cfg), ("text no-cache", lm.reset, cfg),
                                           *((f"text cached {b}", None, c) for b, c in baseline))
    for name, hook, conf in text_runs:
        lm.reset()
        recs = run_conversation(LiveAssistant(conf, models, speaker=speaker()), clips, None, hook)
        detail[name] = recs
        rows.append(summarize(name, recs))
        print(f"{name}: done", file=sys.stderr)
    del lm, models

    if not args.skip_vlm:
        from edge_mmm.vision.api import load_vlm

        vlm_dir = args.vlm or build_vlm(Path.home() / ".cache" / "edge-mmm" / "bench")
        vlm = load_vlm(vlm_dir, backend=args.vlm_backend, threads=args.threads,
                       vision_precision=args.vision_precision, lm_backend=args.vlm_lm_backend)
        models = LiveModels(asr, vlm)
        frame = camera_view()

        def no_cache():
            vlm.cache.clear()
            vlm.reset()

        for name, hook, conf in (("vlm cached", None, cfg), ("vlm no-cache", no_cache, cfg),
                                 *((f"vlm cached {b}", None, c) for b, c in baseline)):
            no_cache()
            recs = run_conversation(LiveAssistant(conf, models, speaker=speaker()), clips, frame, hook)
            detail[name] = recs
            if name.startswith("vlm cached"):
                rows.append(summarize(f"{name}: first image", recs[:1]))
                rows.append(summarize(f"{name}: cached image", recs[1:]))
            else:
                rows.append(summarize(name, recs))
            print(f"{name}: done", file=sys.stderr)

    print_table(rows, COLUMNS)
    by = {r["config"]: r for r in rows}
    pairs = {  # eos -> first token, slower / faster
        "text, KV cache dropped / cached": ("text no-cache", "text cached"),
        "text cached, sequential / pipeline": ("text cached sequential", "text cached"),
        "vlm, caches cleared / cached image": ("vlm no-cache", "vlm cached: cached image"),
        "vlm first image, sequential / pipeline": ("vlm cached sequential: first image", "vlm cached: first image"),
        "vlm cached image, sequential / pipeline": ("vlm cached sequential: cached image", "vlm cached: cached image"),
    }
    ratios = {}
    for label, (slow, fast) in pairs.items():
        a, b = (by.get(slow) or {}).get("eos_to_first_token_s"), (by.get(fast) or {}).get("eos_to_first_token_s")
        if a and b:
            ratios[f"eos->first token, {label}"] = a / b
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    out = "live_speak.json" if args.speak else "live.json"  # a --speak run does not replace the reference
    path = write_json(out, {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                            "summary": rows, "ratios": ratios, "turns": detail})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
