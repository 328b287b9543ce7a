"""Our Triton kernels vs the best torch alternative on a CUDA GPU: time, GB/s or TFLOP/s, % of peak.

    python benchmarks/kernels.py [--ops w4a16,rms_norm,...] [--no-compile] [--out results/kernels-<gpu>.json]

Peaks are measured in the same run: bandwidth with a 1 GiB device-to-device copy (read + write bytes),
compute with a 8192^3 fp16 torch.mm. Memory-bound ops report GB/s of the bytes they must move (the
ideal traffic: packed weights + activations once), compute-bound ones TFLOP/s. Alternatives: eager
torch (our references or the model's own code), torch.compile of the same (unless --no-compile),
F.scaled_dot_product_attention, dense fp16 F.linear, and torch's int4 tinygemm
(aten._weight_int4pack_mm) when this torch has it. Times: triton.testing.do_bench medians.
`e2e` runs whole models (random weights, LM int4) with kernels on vs off in the same run: LM decode
tok/s (and whether the greedy tokens agree), prefill, Whisper-tiny and SigLIP encoder latency.
Every case is independent: a failure is recorded in the table and the JSON, and the run goes on.
Exits with status 2 and a message when there is no CUDA device (the kernels are verified on CPU by
`pytest tests/kernels`, under the Triton interpreter).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

COLUMNS = ["op", "shape", "impl", "ms", "metric", "value", "pct_peak", "speedup"]


class Bench:
    """Times callables for one op and shape; the first entry is ours, the rest torch alternatives."""

    def __init__(self, ctx, op: str, shape: str, metric: str, amount: float):
        self.ctx, self.op, self.shape, self.metric, self.amount = ctx, op, shape, metric, amount
        self.rows: List[dict] = []

    def time(self, impl: str, fn: Callable[[], object], compile_it: bool = False) -> None:
        import torch
        from triton.testing import do_bench

        row = {"op": self.op, "shape": self.shape, "impl": impl, "metric": self.metric}
        try:
            if compile_it:
                if self.ctx.no_compile:
                    return
                fn = torch.compile(fn, dynamic=False)
                row["impl"] = impl + " (torch.compile)"
            fn()  # warm up (and compile) before timing
            if self.ctx.device.type == "cuda":
                torch.cuda.synchronize()
            ms = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            row["ms"] = ms
            value = self.amount / (ms * 1e-3) / (1e9 if self.metric == "GB/s" else 1e12)
            row["value"] = value
            peak = self.ctx.peak_gbs if self.metric == "GB/s" else self.ctx.peak_tflops
            row["pct_peak"] = 100.0 * value / peak
        except Exception as exc:  # one failing alternative must not stop the run
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            if self.ctx.verbose:
                traceback.print_exc()
        self.rows.append(row)

    def finish(self) -> List[dict]:
        ours = self.rows[0] if self.rows and "ms" in self.rows[0] else None
        others = [r["ms"] for r in self.rows[1:] if "ms" in r]
        if ours is not None and others:
            ours["speedup"] = min(others) / ours["ms"]  # vs the fastest torch alternative
        for r in self.rows:
            if "error" in r:
                r["value"] = None
                r["impl"] += f" [failed: {r['error']}]"
        return self.rows


class Context:
    def __init__(self, no_compile: bool, verbose: bool):
        import torch

        self.no_compile, self.verbose = no_compile, verbose
        self.device = torch.device("cuda")
        self.peak_gbs = self._copy_bandwidth()
        self.peak_tflops = self._matmul_tflops()

    def _copy_bandwidth(self) -> float:
        import torch
        from triton.testing import do_bench

        a = torch.empty(1 << 30, dtype=torch.uint8, device=self.device)
        b = torch.empty_like(a)
        ms = do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
        del a, b
        return 2 * (1 << 30) / (ms * 1e-3) / 1e9

    def _matmul_tflops(self) -> float:
        import torch
        from triton.testing import do_bench

        n = 8192
        a = torch.randn(n, n, device=self.device, dtype=torch.float16)
        b = torch.randn(n, n, device=self.device, dtype=torch.float16)
        ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
        return 2 * n ** 3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------- cases
def _packed(ctx, n: int, k: int, bits: int, group: int):
    import torch
    from edge_mmm.quant import quantize_weight

    p = quantize_weight(0.02 * torch.randn(n, k, device=ctx.device), bits=bits, group_size=group, symmetric=bits == 8,
                        scale_dtype=torch.float16)
    return p.qweight.to(ctx.device), p.scales.to(ctx.device), None if p.zeros is None else p.zeros.to(ctx.device)


def _tinygemm(ctx, n: int, k: int, group: int, m: int):
    """torch's int4 weight-only mm (timing only: random codes in its own packed layout), or raise."""
    import torch

    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=ctx.device)
    packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
    sz = torch.randn(k // group, n, 2, dtype=torch.bfloat16, device=ctx.device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=ctx.device)
    return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


def bench_quant_matmul(ctx) -> List[dict]:
    import torch
    import torch.nn.functional as F
    from edge_mmm.kernels import w4a16_matmul, w4a16_matmul_reference, w8a16_matmul, w8a16_matmul_reference

    rows = []
    group = 64
    for bits in (4, 8):
        for (n, k) in [(4096, 4096), (2048, 8192), (8192, 2048), (576, 1536)]:
            qw, s, z = _packed(ctx, n, k, bits, group)
            w_dense = torch.randn(n, k, dtype=torch.float16, device=ctx.device)
            op = "w4a16_matmul" if bits == 4 else "w8a16_matmul"
            ours = w4a16_matmul if bits == 4 else w8a16_matmul
            ref = w4a16_matmul_reference if bits == 4 else w8a16_matmul_reference
            weight_bytes = qw.numel() + s.numel() * 2 + (0 if z is None else z.numel() * 2)
            for m in (1, 4, 128):
                x = torch.randn(m, k, dtype=torch.float16, device=ctx.device)
                if m <= 4:  # decode: bandwidth bound
                    b = Bench(ctx, op, f"M={m} N={n} K={k} g{group}", "GB/s", weight_bytes + 2 * m * (k + n))
                else:  # prefill: compute bound
                    b = Bench(ctx, op, f"M={m} N={n} K={k} g{group}", "TFLOP/s", 2.0 * m * n * k)
                b.time("triton (ours)", lambda: ours(x, qw, s, z, group))
                b.time("torch fp16 F.linear (dense weight, 4x/2x the bytes)", lambda: F.linear(x, w_dense))
                b.time("torch dequant + matmul (reference)", lambda: ref(x, qw, s, z, group))
                if (n, k) == (4096, 4096):  # torch.compile once per width and M (each compile takes seconds)
                    b.time("torch dequant + matmul (reference)", lambda: ref(x, qw, s, z, group), compile_it=True)
                if bits == 4:
                    try:
                        fn = _tinygemm(ctx, n, k, group, m)
                    except Exception as exc:
                        b.rows.append({"op": op, "shape": b.shape, "impl": "torch int4 tinygemm", "metric": b.metric,
                                       "error": f"unavailable: {type(exc).__name__}: {exc}".splitlines()[0][:160]})
                    else:
                        b.time("torch int4 tinygemm (_weight_int4pack_mm, bf16)", fn)
                rows += b.finish()
    return rows


def bench_rms_norm(ctx) -> List[dict]:
    import torch
    from edge_mmm.kernels import rms_norm, rms_norm_reference

    rows = []
    for m, h in [(1, 2048), (512, 2048), (4096, 576)]:
        x = torch.randn(m, h, dtype=torch.float16, device=ctx.device)
        r = torch.randn_like(x)
        w = torch.rand(h, dtype=torch.float16, device=ctx.device)
        b = Bench(ctx, "rms_norm+residual", f"{m}x{h} fp16", "GB/s", 2 * (4 * m * h + h))
        b.time("triton (ours)", lambda: rms_norm(x, w, 1e-5, residual=r))
        b.time("torch eager", lambda: rms_norm_reference(x, w, 1e-5, residual=r))
        b.time("torch eager", lambda: rms_norm_reference(x, w, 1e-5, residual=r), compile_it=True)
        rows += b.finish()
    return rows


def bench_elementwise(ctx) -> List[dict]:
    import torch
    from edge_mmm.kernels import gelu_tanh, gelu_tanh_reference, swiglu, swiglu_reference

    rows = []
    for m, n in [(1, 8192), (512, 8192)]:
        g = torch.randn(m, n, dtype=torch.float16, device=ctx.device)
        u = torch.randn_like(g)
        b = Bench(ctx, "swiglu", f"{m}x{n} fp16", "GB/s", 3 * 2 * m * n)
        b.time("triton (ours)", lambda: swiglu(g, u))
        b.time("torch eager F.silu(g) * u", lambda: torch.nn.functional.silu(g) * u)
        b.time("torch eager F.silu(g) * u", lambda: torch.nn.functional.silu(g) * u, compile_it=True)
        rows += b.finish()
        b = Bench(ctx, "gelu_tanh", f"{m}x{n} fp16", "GB/s", 2 * 2 * m * n)
        b.time("triton (ours)", lambda: gelu_tanh(g))
        b.time("torch eager F.gelu(tanh)", lambda: torch.nn.functional.gelu(g, approximate="tanh"))
        b.time("torch float32 reference", lambda: gelu_tanh_reference(g))
        b.time("torch eager F.gelu(tanh)", lambda: torch.nn.functional.gelu(g, approximate="tanh"), compile_it=True)
        rows += b.finish()
    return rows


def bench_rope(ctx) -> List[dict]:
    import torch
    from edge_mmm.kernels import rope

    def hf_rope(q, k, cos, sin):  # the model's own code (edge_mmm.models.llama.apply_rope)
        def rot(x):
            half = x.shape[-1] // 2
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
        return rot(q), rot(k)

    rows = []
    for t, hq, hkv in [(1, 32, 8), (512, 32, 8)]:
        q = torch.randn(1, t, hq, 64, dtype=torch.float16, device=ctx.device).transpose(1, 2)
        k = torch.randn(1, t, hkv, 64, dtype=torch.float16, device=ctx.device).transpose(1, 2)
        ang = torch.arange(t, device=ctx.device)[:, None] * (1e-4 ** (torch.arange(32, device=ctx.device) / 32))[None]
        cos, sin = torch.cat((ang, ang), -1).cos().half(), torch.cat((ang, ang), -1).sin().half()
        b = Bench(ctx, "rope q+k", f"T={t} Hq={hq} Hkv={hkv} D=64 fp16", "GB/s", 2 * 2 * t * (hq + hkv) * 64)
        b.time("triton (ours)", lambda: rope(q, k, cos, sin))
        b.time("torch eager (HF rotate_half)", lambda: hf_rope(q, k, cos, sin))
        b.time("torch eager (HF rotate_half)", lambda: hf_rope(q, k, cos, sin), compile_it=True)
        rows += b.finish()
    return rows


def bench_attention(ctx) -> List[dict]:
    import torch
    import torch.nn.functional as F
    from edge_mmm.kernels import decode_attention, flash_attention

    rows = []
    for hq, hkv, s, causal, dtype in [(9, 3, 1024, True, torch.float16), (32, 8, 4096, True, torch.bfloat16),
                                      (12, 12, 1024, False, torch.float16)]:
        q = torch.randn(1, hq, s, 64, dtype=dtype, device=ctx.device)
        k = torch.randn(1, hkv, s, 64, dtype=dtype, device=ctx.device)
        v = torch.randn_like(k)
        flops = 4.0 * hq * s * s * 64 * (0.5 if causal else 1.0)
        name = "flash_attention" + (" causal" if causal else "")
        b = Bench(ctx, name, f"H={hq}/{hkv} S={s} D=64 {str(dtype)[6:]}", "TFLOP/s", flops)
        b.time("triton (ours)", lambda: flash_attention(q, k, v, causal=causal))
        b.time("torch F.scaled_dot_product_attention",
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv))
        rows += b.finish()
    for batch, hq, hkv, s in [(1, 32, 8, 4096), (1, 9, 3, 4096), (4, 32, 8, 2048)]:
        q = torch.randn(batch, hq, 64, dtype=torch.float16, device=ctx.device)
        kc = torch.randn(batch, hkv, s, 64, dtype=torch.float16, device=ctx.device)
        vc = torch.randn_like(kc)
        lens = torch.full((batch,), s, dtype=torch.int32, device=ctx.device)
        b = Bench(ctx, "decode_attention", f"B={batch} H={hq}/{hkv} cache={s} D=64 fp16", "GB/s",
                  2 * 2 * batch * hkv * s * 64)
        b.time("triton (ours, split-KV)", lambda: decode_attention(q, kc, vc, lens))
        b.time("torch F.scaled_dot_product_attention",
               lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=hq != hkv))
        rows += b.finish()
    return rows


def bench_front_ends(ctx) -> List[dict]:
    import torch
    from edge_mmm.kernels import log_mel, log_mel_reference, preprocess_image, preprocess_image_reference

    rows = []
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    for (h, w), size in [((720, 1280), 512), ((1080, 1920), 384)]:
        frame = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, device=ctx.device)
        b = Bench(ctx, "preprocess_image", f"{h}x{w} BGR -> 3x{size}x{size} fp32", "GB/s", h * w * 3 + 12 * size * size)
        b.time("triton (ours)", lambda: preprocess_image(frame, size, mean, std))
        b.time("torch eager (flip, interpolate, normalize)", lambda: preprocess_image_reference(frame, size, mean, std))
        b.time("torch eager (flip, interpolate, normalize)", lambda: preprocess_image_reference(frame, size, mean, std),
               compile_it=True)
        rows += b.finish()
    audio = 0.1 * torch.randn(16000 * 30, device=ctx.device)
    b = Bench(ctx, "log_mel (incl. cuFFT STFT)", "30 s, 80 mels", "GB/s", 4 * (201 * 3001 * 2 + 80 * 3000))
    b.time("triton (ours)", lambda: log_mel(audio, 80))
    b.time("torch eager (whisper math)", lambda: log_mel_reference(audio, 80))
    b.time("torch eager (whisper math)", lambda: log_mel_reference(audio, 80), compile_it=True)
    rows += b.finish()
    return rows


def _wall_ms(ctx, fn, repeats: int = 3) -> float:
    """Median wall time of `fn` in ms (synchronized), after one warm-up call."""
    import statistics
    import time

    import torch

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


E2E_DTYPE = None  # torch.float16, set in bench_e2e (torch is imported lazily)
E2E_TOKENS = (128, 64)  # prompt length, greedy decode steps
E2E_LMS = {
    "SmolLM2-135M shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                               num_kv_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "SmolLM2-360M shape": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15,
                               num_kv_heads=5, rope_theta=100000.0, tie_word_embeddings=True),
}
E2E_ENCODERS = True


def bench_e2e(ctx) -> List[dict]:
    """Whole models with random weights, kernels on ("auto") vs off ("reference"), in the same run.

    LM: SmolLM2-135M / 360M shapes, INT4 g64 (fp16 scales), fp16 activations: prefill 128 tokens, then
    64 greedy decode steps; pct_peak is weight bytes x tok/s over the measured copy bandwidth. Encoders:
    Whisper tiny encoder on a 30 s window, SigLIP (SmolVLM's 768-wide, 512 px) on one tile.
    Rows for "kernels on" also say how many greedy tokens equal the "kernels off" run.
    """
    import torch
    from edge_mmm.kernels import kernel_mode
    from edge_mmm.models.llama import KVCache, Llama, LlamaConfig
    from edge_mmm.quant import quantize_model

    rows = []
    dt = E2E_DTYPE or torch.float16
    lms = {name: LlamaConfig(**kw) for name, kw in E2E_LMS.items()}
    prompt_len, new_tokens = E2E_TOKENS
    for name, cfg in lms.items():
        try:
            torch.manual_seed(0)
            model = Llama(cfg).to(device=ctx.device, dtype=dt).eval()
            quantize_model(model, bits=4, group_size=64, scale_dtype=dt)
            model.to(ctx.device)
            weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=ctx.device)
            tokens_by_mode = {}
            for mode, impl in (("auto", "kernels on (Triton)"), ("reference", "kernels off (torch)")):
                with kernel_mode(mode), torch.inference_mode():
                    def prefill():
                        cache = KVCache.for_config(cfg, prompt_len + new_tokens + 1, dtype=dt, device=ctx.device)
                        return cache, model(prompt, cache=cache, last_only=True)

                    def decode():
                        cache, logits = prefill()
                        out = []
                        for _ in range(new_tokens):
                            nxt = logits[:, -1].argmax(-1, keepdim=True)
                            out.append(nxt)
                            logits = model(nxt, cache=cache)
                        return torch.cat(out, 1)

                    prefill_ms = _wall_ms(ctx, prefill)
                    total_ms = _wall_ms(ctx, decode, repeats=1)
                    tokens_by_mode[mode] = decode().cpu()
                decode_ms = max(total_ms - prefill_ms, 1e-6) / new_tokens
                tok_s = 1e3 / decode_ms
                row = {"op": "e2e LM decode", "shape": f"{name}, int4 g64, prompt {prompt_len}", "impl": impl,
                       "ms": decode_ms, "metric": "tok/s", "value": tok_s,
                       "pct_peak": 100.0 * weight_bytes * tok_s / 1e9 / ctx.peak_gbs}
                rows.append(row)
                rows.append({"op": "e2e LM prefill", "shape": f"{name}, {prompt_len} tokens", "impl": impl,
                             "ms": prefill_ms, "metric": "tok/s", "value": prompt_len * 1e3 / prefill_ms})
            same = int((tokens_by_mode["auto"] == tokens_by_mode["reference"]).cumprod(1).sum())
            rows[-4]["impl"] += f" [greedy tokens equal to kernels off: first {same}/{new_tokens}]"
            rows[-4]["speedup"] = rows[-4]["value"] / rows[-2]["value"]
            rows[-3]["speedup"] = rows[-1]["ms"] / rows[-3]["ms"]
            del model
        except Exception as exc:
            rows.append({"op": "e2e LM", "shape": name, "impl": f"[failed: {type(exc).__name__}: {exc}]"[:200]})
            if ctx.verbose:
                traceback.print_exc()

    encoders = []
    if not E2E_ENCODERS:
        return rows
    try:
        from edge_mmm.models.whisper import PRESETS, Whisper

        whisper = Whisper(PRESETS["tiny"]).to(device=ctx.device, dtype=dt).eval()
        mel = torch.randn(1, 80, 3000, device=ctx.device, dtype=dt)
        encoders.append(("e2e Whisper tiny encoder", f"30 s window {str(dt)[6:]}", lambda: whisper.encoder(mel)))
    except Exception as exc:
        rows.append({"op": "e2e Whisper", "impl": f"[failed: {type(exc).__name__}: {exc}]"[:200]})
    try:
        from edge_mmm.models.siglip import SiglipVisionConfig, SiglipVisionTransformer

        siglip = SiglipVisionTransformer(SiglipVisionConfig()).to(device=ctx.device, dtype=dt).eval()
        pixels = torch.randn(1, 3, 512, 512, device=ctx.device, dtype=dt)
        encoders.append(("e2e SigLIP encoder", f"768w x 12 layers, 512 px tile {str(dt)[6:]}", lambda: siglip(pixels)))
    except Exception as exc:
        rows.append({"op": "e2e SigLIP", "impl": f"[failed: {type(exc).__name__}: {exc}]"[:200]})
    for op, shape, fn in encoders:
        timed = []
        for mode, impl in (("auto", "kernels on (Triton)"), ("reference", "kernels off (torch)")):
            try:
                with kernel_mode(mode), torch.inference_mode():
                    ms = _wall_ms(ctx, fn, repeats=5)
                timed.append({"op": op, "shape": shape, "impl": impl, "ms": ms, "metric": "ms"})
            except Exception as exc:
                timed.append({"op": op, "shape": shape, "impl": f"{impl} [failed: {type(exc).__name__}: {exc}]"[:200]})
        if len(timed) == 2 and "ms" in timed[0] and "ms" in timed[1]:
            timed[0]["speedup"] = timed[1]["ms"] / timed[0]["ms"]
        rows += timed
    return rows


BENCHES: Dict[str, Callable] = {
    "w4a16": bench_quant_matmul, "rms_norm": bench_rms_norm, "elementwise": bench_elementwise, "rope": bench_rope,
    "attention": bench_attention, "front_ends": bench_front_ends, "e2e": bench_e2e,
}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the torch.compile alternatives (about 20 compiles; the run is minutes faster)")
    ap.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device (torch.cuda.is_available() is False). These benchmarks "
              "time the Triton kernels on a GPU; on CPU, `pytest tests/kernels` verifies them under the "
              "Triton interpreter.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py: triton is not installed; pip install 'edge-mmm[cuda]'", file=sys.stderr)
        return 2
    unknown = [o for o in args.ops.split(",") if o not in BENCHES]
    if unknown:
        print(f"unknown --ops {unknown}; choose from {list(BENCHES)}", file=sys.stderr)
        return 2

    from edge_mmm.kernels import set_kernel_mode

    set_kernel_mode("auto")  # CUDA tensors -> Triton
    torch.manual_seed(0)
    ctx = Context(args.no_compile, args.verbose)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: measured peak {ctx.peak_gbs:.0f} GB/s (1 GiB D2D copy), {ctx.peak_tflops:.0f} TFLOP/s "
          f"(fp16 8192^3 torch.mm)")
    rows: List[dict] = []
    for name in args.ops.split(","):
        try:
            rows += BENCHES[name](ctx)
        except Exception as exc:
            rows.append({"op": name, "impl": f"[setup failed: {type(exc).__name__}: {exc}]"[:200]})
            if args.verbose:
                traceback.print_exc()
        torch.cuda.empty_cache()
    print_table(rows, COLUMNS)
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    payload = {"machine": machine_info(), "gpu": gpu, "triton": triton.__version__, "cuda": torch.version.cuda,
               "peak_gbs_copy": ctx.peak_gbs, "peak_tflops_fp16_mm": ctx.peak_tflops, "rows": rows}
    path = write_json(args.out or f"kernels-{slug}.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
