"""Every kernel the interpreter tests run also compiles to a GPU binary (no GPU needed).

The interpreter executes kernels as NumPy and accepts things the compiler rejects (non-constexpr
globals, mixed dtypes in tl.dot, bad constexpr branches). This test records real launches of each
op on small inputs, then compiles those exact specializations with Triton's CUDA backend for Jetson
Orin (sm_87) and Hopper (sm_90) down to cubin (ptxas ships with the triton wheel); sm_90 under `-m slow`.

It runs in a child process: a process that imported triton with TRITON_INTERPRET=1 has Triton's own
standard library (tl.sum, tl.max, ...) built for the interpreter and cannot compile.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from edge_mmm.kernels import (decode_attention, flash_attention, gelu_tanh, log_mel, preprocess_image, rms_norm, rope,
                              swiglu, w4a16_matmul, w8a16_matmul)
from edge_mmm.kernels.dispatch import _LazyKernel

DEVICE = "cpu"  # launches are only recorded, never run

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
          torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}
_OPTIONS = ("num_warps", "num_stages")


def _record(fn):
    calls = []

    def getitem(self, grid):
        def run(*args, **kwargs):
            calls.append((self, args, kwargs))  # record only: compiling needs no results
        return run

    _LazyKernel.__getitem__ = getitem
    fn()
    return calls


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def _compile(kernel: _LazyKernel, args, kwargs, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel.build()  # binds `tl` in the kernel's module
    names = list(inspect.signature(kernel.fn).parameters)
    signature, constexprs = {}, {}
    for name, value in zip(names, args):
        signature[name] = _arg_type(value)
    for name, value in kwargs.items():
        if name in _OPTIONS:
            continue
        signature[name] = "constexpr"
        constexprs[name] = value
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    compiled = triton.compile(ASTSource(fn=triton.jit(kernel.fn), signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    assert compiled.asm["cubin"], f"{kernel.__name__}: empty cubin"


def _cases():
    from edge_mmm.quant import quantize_weight

    def d(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    p4 = quantize_weight(0.05 * torch.randn(32, 64), bits=4, group_size=32, scale_dtype=torch.float16)
    p4s = quantize_weight(0.05 * torch.randn(32, 64), bits=4, group_size=32, symmetric=True)
    p8 = quantize_weight(0.05 * torch.randn(32, 64), bits=8, group_size=32, symmetric=True,
                         scale_dtype=torch.float16)
    w4 = [t.to(DEVICE) if t is not None else None for t in (p4.qweight, p4.scales, p4.zeros)]
    w4s = [t.to(DEVICE) if t is not None else None for t in (p4s.qweight, p4s.scales, p4s.zeros)]
    w8 = [t.to(DEVICE) for t in (p8.qweight, p8.scales)]
    p128 = quantize_weight(0.05 * torch.randn(32, 256), bits=4, group_size=128, scale_dtype=torch.float16)
    w128 = [p128.qweight, p128.scales, p128.zeros]  # one group per K tile: the per-row scale load
    p8g64 = quantize_weight(0.05 * torch.randn(32, 128), bits=8, group_size=64, symmetric=True)
    w8g64 = [p8g64.qweight, p8g64.scales]
    cos, sin = d(8, 16), d(8, 16)
    lens = torch.tensor([5], device=DEVICE)
    ids = torch.zeros(1, 20, dtype=torch.long, device=DEVICE)
    frame = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, device=DEVICE)
    cases = {
        "rms_norm": lambda: rms_norm(d(2, 64, dtype=torch.bfloat16), d(64, dtype=torch.bfloat16), 1e-6,
                                     residual=d(2, 64, dtype=torch.bfloat16)),
        "swiglu+gelu": lambda: (swiglu(d(70, dtype=torch.float16), d(70, dtype=torch.float16)),
                                gelu_tanh(d(70, dtype=torch.bfloat16))),
        "rope": lambda: rope(d(1, 4, 3, 16, dtype=torch.float16), d(1, 2, 3, 16, dtype=torch.float16), cos, sin,
                             torch.tensor([1, 2, 3], device=DEVICE)),
        "w4a16 gemv": lambda: (w4a16_matmul(d(1, 64, dtype=torch.float16), *w4, 32),
                               w4a16_matmul(d(3, 256, dtype=torch.bfloat16), *w128, 128)),
        "w4a16 gemm": lambda: (w4a16_matmul(d(20, 64, dtype=torch.bfloat16), *w4s, 32),
                               w4a16_matmul(d(20, 64), *w4s, 32)),
        "w8a16": lambda: (w8a16_matmul(d(2, 64, dtype=torch.float16), *w8, None, 32),
                          w8a16_matmul(d(20, 128, dtype=torch.float16), *w8g64, None, 64),
                          w8a16_matmul(d(20, 64, dtype=torch.float16), *w8, None, 32)),
        "flash_attention": lambda: (flash_attention(*(d(1, 2, 20, 64, dtype=torch.float16) for _ in range(3)),
                                                    causal=True, image_block_ids=ids),
                                    flash_attention(*(d(1, 2, 20, 64, dtype=torch.float32) for _ in range(3))),
                                    flash_attention(*(d(1, 2, 20, 64, dtype=torch.bfloat16) for _ in range(3)),
                                                    key_mask=ids == 0)),
        "decode_attention": lambda: decode_attention(d(1, 6, 64, dtype=torch.bfloat16),
                                                     d(1, 2, 30, 64, dtype=torch.bfloat16),
                                                     d(1, 2, 30, 64, dtype=torch.bfloat16), lens, num_splits=2),
        "preprocess_image": lambda: preprocess_image(frame, 6, (0.5,) * 3, (0.5,) * 3, dtype=torch.float16),
        "log_mel": lambda: log_mel(d(2000), 80),
    }
    return cases


CASES = ["rms_norm", "swiglu+gelu", "rope", "w4a16 gemv", "w4a16 gemm", "w8a16", "flash_attention",
         "decode_attention", "preprocess_image", "log_mel"]


def _child(archs) -> None:
    """Record each case's launches on CPU tensors and compile them; print {case: error or ""} as JSON."""
    import importlib

    for name in ("activations", "rms_norm", "rope", "quant_matmul", "flash_attention", "decode_attention",
                 "preprocess", "log_mel"):
        importlib.import_module(f"edge_mmm.kernels.{name}").use_triton = lambda *tensors: True
    results = {}
    for case, fn in _cases().items():
        try:
            calls = _record(fn)
            assert calls, "no Triton kernel was launched"
            seen = set()
            for kernel, args, kwargs in calls:
                key = (kernel.__name__, tuple(_arg_type(a) for a in args), tuple(sorted(kwargs.items())))
                if key not in seen:
                    seen.add(key)
                    for arch in archs:
                        _compile(kernel, args, kwargs, arch)
            results[case] = ""
        except Exception as exc:  # reported per case by the parent
            results[case] = f"{type(exc).__name__}: {exc}"[-3000:]
    print(json.dumps(results))


_results = {}


def _compile_all(arch: int) -> dict:
    """One child process per architecture, shared by that architecture's test cases."""
    pytest.importorskip("triton")
    if arch not in _results:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, __file__, str(arch)], env=env, capture_output=True, text=True,
                              timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        _results[arch] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _results[arch]


@pytest.mark.parametrize("case", CASES)
def test_kernels_compile_for_orin_sm87(case):
    error = _compile_all(87)[case]
    assert error == "", error


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_kernels_compile_for_hopper_sm90(case):
    error = _compile_all(90)[case]
    assert error == "", error


if __name__ == "__main__":
    _child([int(a) for a in sys.argv[1:]] or [87])
