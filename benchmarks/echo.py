"""Barge-in under the assistant's own voice: the half-duplex echo gate vs WebRTC AEC3 + the gate (`--echo-cancel`).

A simulated room on a virtual clock (no audio devices, deterministic): espeak-ng speaks an answer into a
PlaybackBuffer that a 20 ms sink drains; the microphone hears what was played `--echo-delay-ms` later at
`--echo-gain`, and from `--user-at` seconds a user in another voice asks a question at a level relative to
the echo. Silero VAD (0.5) listens to what the gate / canceller lets through; its first voiced block stops the
playback (a barge-in), after which the room hears only the user. Per user level and mode: the delay from the
user's first word to the first voiced block, voiced blocks before the user spoke (the answer taken for
speech), what AEC took off the microphone while the answer played (the user included; a run with no user
gives the echo alone), and Whisper tiny.en's WER on the user's question after the barge-in.

A second table, with no user: the output stalls for `--dropouts` ms 2 s into the answer (an underrun), so the
echo comes later than AEC3 expects until it re-converges; per dropout, the speech starts (VADIterator, the
runtime's barge-in trigger) on what AEC3 + the gate let through, with and without the leak check
(`EchoCancelConfig.leak_correlation`; 1.0 turns it off).

    python benchmarks/echo.py [--levels -18,-12,-6,0,6] [--echo-gain 0.5] [--echo-delay-ms 45]
                              [--dropouts 40,80,160,300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

ANSWER = ("The capital of France is Paris. It is known for the Eiffel Tower, its museums and its cafes, "
          "and many people visit it every year.")
QUESTION = "Wait, what about the capital of Germany?"
from edge_mmm.audio.constants import SAMPLE_RATE as RATE  # noqa: E402
MIC_BLOCK = 512
SINK_BLOCK_S = 0.02
OUT_LATENCY_S = 0.03
DROPOUT_AT_S = 2.0  # where the output stalls (--dropouts), in the played stream


def to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    n = int(round(x.size * RATE / rate))
    return np.interp(np.arange(n) * rate / RATE, np.arange(x.size), x).astype(np.float32)


def converse(mode: str, answer: np.ndarray, tts_rate: int, user: np.ndarray, user_gain: float, args,
             dropout_s: float = 0.0, leak_correlation: float = 0.6) -> dict:
    from edge_mmm.audio.vad import SileroVad, VADIterator
    from edge_mmm.speech_out.echo import EchoGate, EchoGateConfig
    from edge_mmm.speech_out.playback import PlaybackBuffer

    buffer = PlaybackBuffer(tts_rate)
    buffer.push(answer, tag=1)
    gate_cfg = EchoGateConfig(echo_gain=args.echo_gain)
    if mode == "aec":
        from edge_mmm.speech_out.aec import EchoCancelConfig, EchoCanceller

        gate = EchoCanceller(buffer, gate_cfg, EchoCancelConfig(leak_correlation=leak_correlation))
    else:
        gate = EchoGate(buffer, gate_cfg)
    total = int((args.user_at + user.size / RATE + 1.0) * RATE)
    stall = (int(DROPOUT_AT_S * RATE), int(dropout_s * RATE))
    near = np.random.default_rng(0).standard_normal(total).astype(np.float32) * 3e-4
    u0 = int(args.user_at * RATE)
    near[u0:u0 + user.size] += user_gain * user[:total - u0]
    lag = int(round((OUT_LATENCY_S + args.echo_delay_ms / 1000) * RATE))
    sink_n = int(round(tts_rate * SINK_BLOCK_S))
    played, pulls, vad, segmenter = [], 0, SileroVad(), VADIterator()
    out, voiced, starts = np.zeros(total, np.float32), [], []
    for j in range(0, total - MIC_BLOCK + 1, MIC_BLOCK):
        t = (j + MIC_BLOCK) / RATE
        while pulls * SINK_BLOCK_S <= t:  # the sink drains the buffer in real time
            played.append(buffer.pull(sink_n, pulls * SINK_BLOCK_S + OUT_LATENCY_S)[0])
            pulls += 1
        heard = to_16k(np.concatenate(played), tts_rate)
        src = np.arange(j, j + MIC_BLOCK) - lag
        stalled = (src >= stall[0]) & (src < stall[0] + stall[1])  # the output stalls: silence, then late
        src = np.where(src >= stall[0] + stall[1], src - stall[1], src)
        echo = np.where((src >= 0) & (src < heard.size) & ~stalled, heard[np.clip(src, 0, max(heard.size - 1, 0))],
                        0.0)
        block = gate((args.echo_gain * echo + near[j:j + MIC_BLOCK]).astype(np.float32), t)
        out[j:j + MIC_BLOCK] = block
        starts += [ev.sample / RATE for ev in segmenter.feed(block) if ev.kind == "start"]
        if vad(block) >= 0.5:
            voiced.append(t)
            if len(voiced) == 1:
                buffer.clear()  # barge-in
    after = [v for v in voiced if v >= args.user_at]
    return {"out": out, "false_voiced": len(voiced) - len(after), "starts": starts,
            "leaks_recognised": gate.gate.echo_frames if mode == "aec" else None,
            "detect_s": round(after[0] - args.user_at, 3) if after else None,
            "aec_db": round(gate.suppression_db(), 1) if mode == "aec" else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="-18,-12,-6,0,6", help="user level re the echo in the mic, dB")
    ap.add_argument("--echo-gain", type=float, default=0.5, help="mic level of the echo per unit played")
    ap.add_argument("--echo-delay-ms", type=float, default=45.0, help="played -> heard by the mic")
    ap.add_argument("--user-at", type=float, default=3.5, help="seconds into the answer the user starts")
    ap.add_argument("--voice", default="en-us+m3", help="espeak-ng voice of the user")
    ap.add_argument("--dropouts", default="40,80,160,300",
                    help=f"output stalls (ms) {DROPOUT_AT_S:g} s into the answer, no user ('' skips)")
    args = ap.parse_args(argv)

    from edge_mmm.asr.api import load_asr
    from edge_mmm.asr.transcribe import TranscribeOptions
    from edge_mmm.audio.io import load_audio
    from edge_mmm.audio.synth import synthesize
    from edge_mmm.speech_out.tts import EspeakTts
    from jiwer import wer

    tts = EspeakTts()
    answer = tts.synthesize(ANSWER)
    with tempfile.TemporaryDirectory() as tmp:
        user = load_audio(synthesize(QUESTION, Path(tmp) / "user.wav", voice=args.voice))
    asr = load_asr()
    echo_rms = args.echo_gain * float(np.sqrt(np.mean(answer ** 2)))
    user_rms = float(np.sqrt(np.mean(user ** 2)))
    alone = converse("aec", answer, tts.sample_rate, user, 0.0, args)["aec_db"]
    print(f"AEC3 on the answer alone (no user): {alone} dB off the microphone while it played", flush=True)
    rows = []
    for level in [float(v) for v in args.levels.split(",")]:
        user_gain = 10 ** (level / 20) * echo_rms / user_rms
        for mode in ("gate", "aec"):
            r = converse(mode, answer, tts.sample_rate, user, user_gain, args)
            heard = asr.transcribe(r["out"][int(args.user_at * RATE):],
                                   TranscribeOptions(language="en", timestamps=False)).text
            norm = lambda s: "".join(c for c in s.lower() if c.isalnum() or c == " ").split()  # noqa: E731
            rows.append({"user_db_re_echo": level, "mode": mode, "barge_in_after_s": r["detect_s"],
                         "answer_taken_for_speech": r["false_voiced"], "aec_db": r["aec_db"],
                         "question_wer": round(wer(" ".join(norm(QUESTION)), " ".join(norm(heard)) or "-"), 3),
                         "heard": heard.strip()[:60]})
            print(rows[-1], flush=True)
    dropouts = []
    for ms in [float(v) for v in args.dropouts.split(",") if v.strip()]:
        row = {"dropout_ms": ms}
        for name, rho in (("checked", 0.6), ("unchecked", 1.0)):
            r = converse("aec", answer, tts.sample_rate, user, 0.0, args, dropout_s=ms / 1000, leak_correlation=rho)
            row[f"speech_starts_{name}"] = len(r["starts"])
            row[f"first_start_s_{name}"] = round(r["starts"][0], 2) if r["starts"] else None
            if name == "checked":
                row["leaked_frames_recognised"] = r["leaks_recognised"]
        dropouts.append(row)
        print(row, flush=True)
    print()
    print_table(rows, list(rows[0]))
    print(f"AEC3 on the answer alone (no user): {alone} dB")
    if dropouts:
        print(f"\nthe output stalls {DROPOUT_AT_S:g} s into the answer (no user): speech starts = false barge-ins")
        print_table(dropouts, list(dropouts[0]))
    out = write_json("echo.json", {"aec_db_answer_alone": alone, "echo_gain": args.echo_gain,
                                   "echo_delay_ms": args.echo_delay_ms, "user_at_s": args.user_at,
                                   "answer": ANSWER, "question": QUESTION, "rows": rows,
                                   "dropout_at_s": DROPOUT_AT_S, "dropouts": dropouts, "machine": machine_info()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
