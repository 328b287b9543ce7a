"""flash_attention / decode_attention: Triton (interpreter on CPU) vs float32 SDPA references."""

import pytest
import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels import (decode_attention, decode_attention_reference, flash_attention,
                              flash_attention_reference)
from kernel_testing import DEVICE, assert_close

# Softmax-weighted averages of |v| ~ 1 values: errors come from rounding q, k, p and the output.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _qkv(b, hq, hkv, sq, sk, d, dtype):
    torch.manual_seed(sq * 7 + sk)
    q = torch.randn(b, hq, sq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, sk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, sk, d, device=DEVICE).to(dtype)
    return q, k, v


@pytest.mark.parametrize("b,hq,hkv,sq,sk,d", [(1, 2, 2, 1, 1, 16), (2, 4, 2, 37, 37, 32), (1, 3, 1, 5, 70, 24)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flash_attention(b, hq, hkv, sq, sk, d, causal, dtype):
    q, k, v = _qkv(b, hq, hkv, sq, sk, d, dtype)
    assert_close(flash_attention(q, k, v, causal=causal), flash_attention_reference(q, k, v, causal=causal),
                 *TOL[dtype])


def test_flash_attention_image_blocks_and_views():
    """Two image blocks inside a causal prompt; q/k/v are transposed [B, S, H, D] projections."""
    torch.manual_seed(0)
    b, s, h, d = 2, 40, 2, 16
    q, k, v = (torch.randn(b, s, h, d, device=DEVICE).transpose(1, 2) for _ in range(3))
    ids = torch.zeros(b, s, dtype=torch.long, device=DEVICE)
    ids[0, 3:12] = 1
    ids[0, 20:33] = 2
    ids[1, 5:30] = 1
    got = flash_attention(q, k, v, causal=True, image_block_ids=ids, scale=0.3)
    want = flash_attention_reference(q, k, v, causal=True, image_block_ids=ids, scale=0.3)
    assert_close(got, want, 1e-4, 1e-4)
    # the mask really differs from plain causal inside a block
    assert not torch.allclose(got, flash_attention_reference(q, k, v, causal=True, scale=0.3), atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_key_mask(causal):
    """SigLIP-style padded keys (holes anywhere), and a batch row whose queries see no key at all."""
    torch.manual_seed(2)
    q, k, v = _qkv(2, 2, 2, 20, 20, 16, torch.float32)
    key_mask = torch.rand(2, 20, device=DEVICE) > 0.3
    key_mask[1, :] = False
    got = flash_attention(q, k, v, causal=causal, key_mask=key_mask)
    assert_close(got, flash_attention_reference(q, k, v, causal=causal, key_mask=key_mask), 1e-4, 1e-4)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("b,hq,hkv,s_max,d,lens", [(1, 4, 4, 1, 16, [1]), (2, 6, 2, 150, 32, [150, 67]),
                                                  (3, 3, 1, 90, 24, [1, 64, 89])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_attention(b, hq, hkv, s_max, d, lens, dtype):
    torch.manual_seed(s_max)
    q = torch.randn(b, hq, d, device=DEVICE).to(dtype)
    kc = torch.randn(b, hkv, s_max, d, device=DEVICE).to(dtype)
    vc = torch.randn(b, hkv, s_max, d, device=DEVICE).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = decode_attention_reference(q, kc, vc, seq_lens)
    for splits in (1, 3):  # one chunk, and split-KV with chunks that end past some seq_lens
        assert_close(decode_attention(q, kc, vc, seq_lens, num_splits=splits), want, *TOL[dtype], f"splits={splits}")


def test_decode_attention_on_a_cache_slice():
    """The LM's cache is [layers, B, Hkv, S_max, D]; a layer slice is a strided view."""
    torch.manual_seed(1)
    cache_k = torch.randn(3, 1, 2, 64, 16, device=DEVICE)
    cache_v = torch.randn(3, 1, 2, 64, 16, device=DEVICE)
    q = torch.randn(1, 4, 16, device=DEVICE)
    lens = torch.tensor([41], device=DEVICE)
    k, v = cache_k[1, :, :, :50], cache_v[1, :, :, :50]
    assert_close(decode_attention(q, k, v, lens), decode_attention_reference(q, k, v, lens), 1e-4, 1e-4)
    # and it equals causal prefill attention's last row over the same keys
    want = flash_attention_reference(q[:, :, None], k[:, :, :41], v[:, :, :41], causal=True)[:, :, 0]
    assert_close(decode_attention(q, k, v, lens), want, 1e-4, 1e-4)


def test_bad_inputs_raise_input_error():
    q, k, v = _qkv(1, 3, 2, 4, 4, 8, torch.float32)
    with pytest.raises(InputError, match="multiple"):
        flash_attention(q, k, v)
    q, k, v = _qkv(1, 2, 2, 4, 3, 8, torch.float32)
    with pytest.raises(InputError, match="Sq <= Sk"):
        flash_attention(q, k, v, causal=True)
    with pytest.raises(InputError, match="image_block_ids"):
        flash_attention(q, k, v, image_block_ids=torch.zeros(1, 3, dtype=torch.long, device=DEVICE))
    with pytest.raises(InputError, match="one dtype"):
        decode_attention(q[:, :, 0], k.half(), v.half(), torch.tensor([3], device=DEVICE))
    with pytest.raises(InputError, match="seq_lens must be"):
        decode_attention(q[:, :, 0], k, v, torch.tensor([3, 3], device=DEVICE))
