"""The llama.cpp-numerics RoPE tables follow ggml's arithmetic on every host: `theta_scale` is glibc's
powf (what ggml calls), not numpy's float32 power, which numpy 2 computes with its own SIMD code on AVX-512
hosts, one ulp away for SmolLM2's base (that moved the bit-identical parity test's logits there)."""

import ctypes
import ctypes.util

import numpy as np
import pytest

from edge_mmm.quant.ggml_numerics import ggml_rope_tables

libm_name = ctypes.util.find_library("m")


@pytest.mark.skipif(libm_name is None, reason="no libm on this platform")
@pytest.mark.parametrize("base,head_dim", [(100000.0, 64), (10000.0, 64), (500000.0, 128), (1000000.0, 64)])
def test_rope_angles_use_libm_powf(base, head_dim):
    lib = ctypes.CDLL(libm_name)
    lib.powf.restype, lib.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    lib.cosf.restype, lib.cosf.argtypes = ctypes.c_float, [ctypes.c_float]
    scale = np.float32(lib.powf(float(np.float32(base)), float(np.float32(-2.0 / head_dim))))
    pos = 7
    theta, want = np.float32(pos), []
    for _ in range(head_dim // 2):  # ggml_rope_cache_init: theta *= theta_scale, in fp32
        want.append(np.float32(lib.cosf(float(theta))))
        theta = np.float32(theta * scale)
    cos, _ = ggml_rope_tables(pos, 1, head_dim, base)
    assert cos.shape == (1, head_dim)
    assert np.array_equal(cos[0, :head_dim // 2].numpy(), np.array(want, np.float32))
