"""The kernels at real model shapes on a CUDA GPU (`pytest -m gpu tests/kernels`); skipped elsewhere.

Shapes: SmolLM2-135M / 360M and Llama-3.2-1B projections (W4A16 at M=1 decode and M=128 prefill),
their attention (9/3 and 32/8 heads, head dim 64), a 4k decode cache, SigLIP-size image input from a
720p frame, and a 30 s Whisper window.
"""

import pytest
import torch

from edge_mmm.kernels import (decode_attention, decode_attention_reference, flash_attention, flash_attention_reference,
                              gelu_tanh, gelu_tanh_reference, log_mel, log_mel_reference, preprocess_image,
                              preprocess_image_reference, rms_norm, rms_norm_reference, rope, rope_reference, swiglu,
                              swiglu_reference, w4a16_matmul, w4a16_matmul_reference, w8a16_matmul,
                              w8a16_matmul_reference)
from kernel_testing import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = "cuda"


def _packed(n, k, bits, group, symmetric=False):
    from edge_mmm.quant import quantize_weight

    p = quantize_weight(0.02 * torch.randn(n, k), bits=bits, group_size=group, symmetric=symmetric or bits == 8,
                        scale_dtype=torch.float16)
    return p.qweight.to(CUDA), p.scales.to(CUDA), None if p.zeros is None else p.zeros.to(CUDA)


@pytest.mark.parametrize("n,k", [(4096, 4096), (8192, 2048), (576, 1536), (2048, 8192)])
@pytest.mark.parametrize("m", [1, 4, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_real_shapes(n, k, m, dtype):
    qw, s, z = _packed(n, k, 4, 64)
    x = torch.randn(m, k, device=CUDA).to(dtype)
    want = w4a16_matmul_reference(x, qw, s, z, 64)
    assert_close(w4a16_matmul(x, qw, s, z, 64), want, 3e-2 * want.float().abs().max().item() / 4, 2e-2)


@pytest.mark.parametrize("n,k", [(4096, 4096), (576, 1536)])
@pytest.mark.parametrize("m", [1, 128])
def test_w8a16_real_shapes(n, k, m):
    qw, s, _ = _packed(n, k, 8, 32)
    x = torch.randn(m, k, device=CUDA).half()
    want = w8a16_matmul_reference(x, qw, s, None, 32)
    assert_close(w8a16_matmul(x, qw, s, None, 32), want, 3e-2 * want.float().abs().max().item() / 4, 2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_and_norm_real_shapes(dtype):
    x = torch.randn(512, 2048, device=CUDA).to(dtype)
    r = torch.randn(512, 2048, device=CUDA).to(dtype)
    w = torch.rand(2048, device=CUDA).to(dtype)
    got, want = rms_norm(x, w, 1e-5, residual=r), rms_norm_reference(x, w, 1e-5, residual=r)
    assert_close(got[0], want[0], 1e-2, 1e-2)
    assert_close(got[1], want[1], 0, 0)
    assert_close(swiglu(x, r), swiglu_reference(x, r), 1e-2, 1e-2)
    assert_close(gelu_tanh(x), gelu_tanh_reference(x), 1e-2, 1e-2)


def test_rope_real_shapes():
    q = torch.randn(1, 128, 32, 64, device=CUDA).half().transpose(1, 2)
    k = torch.randn(1, 128, 8, 64, device=CUDA).half().transpose(1, 2)
    ang = torch.arange(4096, device=CUDA)[:, None] * (1e-4 ** (torch.arange(32, device=CUDA) / 32))[None]
    cos, sin = torch.cat((ang, ang), -1).cos().half(), torch.cat((ang, ang), -1).sin().half()
    pos = torch.arange(1000, 1128, device=CUDA)
    for a, b in zip(rope(q, k, cos, sin, pos), rope_reference(q, k, cos, sin, pos)):
        assert_close(a, b, 2e-3, 2e-3)


@pytest.mark.parametrize("hq,hkv,s", [(9, 3, 1024), (32, 8, 2048), (12, 12, 729)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attention_real_shapes(hq, hkv, s, dtype):
    q = torch.randn(1, hq, s, 64, device=CUDA).to(dtype)
    k = torch.randn(1, hkv, s, 64, device=CUDA).to(dtype)
    v = torch.randn(1, hkv, s, 64, device=CUDA).to(dtype)
    causal = hq != hkv  # the LM is causal, SigLIP (12/12, 729 patches) is not
    assert_close(flash_attention(q, k, v, causal=causal), flash_attention_reference(q, k, v, causal=causal),
                 1e-2, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_4k_cache(dtype):
    q = torch.randn(2, 32, 64, device=CUDA).to(dtype)
    kc = torch.randn(2, 8, 4096, 64, device=CUDA).to(dtype)
    vc = torch.randn(2, 8, 4096, 64, device=CUDA).to(dtype)
    lens = torch.tensor([4096, 1537], device=CUDA)
    assert_close(decode_attention(q, kc, vc, lens), decode_attention_reference(q, kc, vc, lens), 1e-2, 1e-2)


def test_front_ends_real_shapes():
    frame = torch.randint(0, 256, (720, 1280, 3), dtype=torch.uint8, device=CUDA)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    assert_close(preprocess_image(frame, 512, mean, std), preprocess_image_reference(frame, 512, mean, std), 1e-4, 1e-5)
    audio = 0.1 * torch.randn(16000 * 30, device=CUDA)
    assert_close(log_mel(audio, 80), log_mel_reference(audio, 80), 1e-4, 1e-4)
