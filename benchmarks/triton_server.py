"""Throughput of the exported repository on a real Triton Inference Server (CPU, nvidia-pytriton's tritonserver,
Python backend) beside `edge-mmm serve` on the same models, in the same run.

Transcription: requests/s for the espeak-ng example sentence (Whisper tiny.en, greedy, one 30 s window).
Generation: tokens/s summed over all clients (SmolLM2-135M Q4_1 GGUF, greedy, `--new-tokens` per answer,
the same chat prompt). Each point: `clients` threads, each sending `--requests` requests back to back;
requests/s = all requests / wall time. Triton: `AssistantClient` over gRPC (streamed generation);
edge-mmm serve: its OpenAI API over HTTP (`/v1/audio/transcriptions`, `/v1/chat/completions`, not streamed).
The two servers run one after the other, never together.

    python benchmarks/triton_server.py [--clients 1 4 16] [--requests 2] [--new-tokens 32] [--repo DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

QUESTION = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def timed(clients, requests, fn):
    """Run fn(i) requests*clients times on `clients` threads; (wall seconds, results)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda c: [fn(c) for _ in range(requests)], range(clients)))
    return time.perf_counter() - t0, [r for rs in results for r in rs]


def bench_triton(repo, clip, args):
    from edge_mmm.exporters.triton_client import AssistantClient
    from edge_mmm.exporters.triton_launch import TritonServer

    rows = []
    with TritonServer(repo).start(timeout=300) as srv:
        clients = {}

        def get(c):
            if c not in clients:
                clients[c] = AssistantClient(repo, srv.grpc_url, "grpc")
            return clients[c]

        get(0).transcribe(clip)  # warm up both paths
        get(0).stream(QUESTION, max_tokens=4).consume()
        for n in args.clients:
            wall, res = timed(n, args.requests, lambda c: get(c).transcribe(clip).text)
            rows.append({"server": "triton (python backend)", "job": "transcribe", "clients": n,
                         "requests": len(res), "wall_s": wall, "req_per_s": len(res) / wall})
            wall, res = timed(n, args.requests,
                              lambda c: len(get(c).stream(QUESTION, max_tokens=args.new_tokens).consume().token_ids))
            rows.append({"server": "triton (python backend)", "job": "generate", "clients": n, "requests": len(res),
                         "wall_s": wall, "req_per_s": len(res) / wall, "tok_per_s": sum(res) / wall})
        for c in clients.values():
            c.close()
    return rows


def bench_serve(clip, args):
    import httpx

    from edge_mmm.exporters.triton_launch import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "edge_mmm.cli", "serve", "--port", str(port), "--queue-size", "64",
           "--max-tokens", str(args.new_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"edge-mmm serve did not start (exit {proc.poll()})")
            time.sleep(0.5)
        audio = Path(clip).read_bytes()

        def transcribe(_):
            r = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("clip.wav", audio, "audio/wav")},
                           timeout=600)
            r.raise_for_status()
            return r.json()["text"]

        def generate(_):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": args.new_tokens,
                                                               "temperature": 0}, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        transcribe(0)
        generate(0)
        rows = []
        for n in args.clients:
            wall, res = timed(n, args.requests, transcribe)
            rows.append({"server": "edge-mmm serve", "job": "transcribe", "clients": n, "requests": len(res),
                         "wall_s": wall, "req_per_s": len(res) / wall})
            wall, res = timed(n, args.requests, generate)
            rows.append({"server": "edge-mmm serve", "job": "generate", "clients": n, "requests": len(res),
                         "wall_s": wall, "req_per_s": len(res) / wall, "tok_per_s": sum(res) / wall})
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per point")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repo", type=Path, help="an exported Python-backend repository (default: export one)")
    args = ap.parse_args()

    from edge_mmm.audio.synth import EXAMPLE_SENTENCE, synthesize
    from edge_mmm.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="edge-mmm-bench-triton-") as tmp:
        clip = synthesize(EXAMPLE_SENTENCE, Path(tmp) / "clip.wav")
        repo = args.repo
        if repo is None:
            repo = Path(tmp) / "repo"
            if cli(["export", "-d", "cpu-x86", "-o", str(repo), "--format", "triton-server", "--triton-backend",
                    "python", "--no-vad", "--json"]) != 0:
                raise SystemExit("export failed")
        rows = bench_triton(repo, clip, args) + bench_serve(clip, args)
    print_table(rows, ["server", "job", "clients", "requests", "wall_s", "req_per_s", "tok_per_s"])
    path = write_json("triton_server.json", {"machine": machine_info(), "args": {k: str(v) for k, v in
                                                                                vars(args).items()},
                                             "cpu_count": os.cpu_count(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
