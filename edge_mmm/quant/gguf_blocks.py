"""Lossless repack of GGUF Q4_0 / Q4_1 / Q8_0 blocks into the packed layout (docs/quantization.md).

GGUF blocks hold 32 weights along K. Q4 blocks store element `j` in the low nibble of byte `j` and
element `j + 16` in its high nibble; our layout stores elements `2j, 2j+1` in byte `j` (low, high),
so only the nibble order changes. Scales and offsets stay float16, exactly as in the file.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from gguf import GGMLQuantizationType

from edge_mmm.errors import ModelFileError
from edge_mmm.quant.packed import PackedWeight

GGUF_BLOCK = 32
# type -> (bytes per block, bytes of float16 header fields before the codes)
_BLOCK_BYTES = {
    GGMLQuantizationType.Q4_0: (18, 2),
    GGMLQuantizationType.Q4_1: (20, 4),
    GGMLQuantizationType.Q8_0: (34, 2),
}
SUPPORTED_GGUF_TYPES = tuple(_BLOCK_BYTES)


def _qtype_name(ggml_type) -> str:
    try:
        return GGMLQuantizationType(int(ggml_type)).name
    except ValueError:
        return f"unknown ggml type {int(ggml_type)}"


def from_gguf(raw: np.ndarray, ggml_type: Union[GGMLQuantizationType, int],
              shape: Sequence[int]) -> PackedWeight:
    """Repack the raw GGUF bytes of a 2-D weight, `shape = (N, K)` (GGUF lists it as `[K, N]`)."""
    name = _qtype_name(ggml_type)
    try:
        qtype = GGMLQuantizationType(int(ggml_type))
    except ValueError:
        qtype = None
    if qtype not in _BLOCK_BYTES:
        raise ModelFileError(f"GGUF tensor type {name} cannot be repacked into the quantized layout; "
                             f"supported: {', '.join(t.name for t in SUPPORTED_GGUF_TYPES)}")
    if len(shape) != 2:
        raise ModelFileError(f"GGUF {name} tensor: expected a 2-D shape (N, K), got {tuple(shape)}")
    n, k = (int(s) for s in shape)
    if k % GGUF_BLOCK:
        raise ModelFileError(f"GGUF {name} tensor: K={k} is not a multiple of the block size {GGUF_BLOCK}")
    block_bytes, header = _BLOCK_BYTES[qtype]
    n_groups = k // GGUF_BLOCK
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if data.size != n * n_groups * block_bytes:
        raise ModelFileError(f"GGUF {name} tensor of shape {(n, k)}: expected {n * n_groups * block_bytes} "
                             f"bytes, got {data.size} (truncated or wrong shape)")
    blocks = data.reshape(n, n_groups, block_bytes)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).reshape(n, n_groups)

    if qtype == GGMLQuantizationType.Q8_0:
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
        return PackedWeight(torch.from_numpy(codes.copy()), torch.from_numpy(scales.copy()), None,
                            bits=8, group_size=GGUF_BLOCK, shape=(n, k))

    qs = blocks[..., header:]                                          # [n, G, 16]
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)              # [n, G, 32] in element order
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8).reshape(n, k // 2)
    zeros = None
    if qtype == GGMLQuantizationType.Q4_1:
        zeros = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(n, n_groups).copy())
    return PackedWeight(torch.from_numpy(packed), torch.from_numpy(scales.copy()), zeros,
                        bits=4, group_size=GGUF_BLOCK, shape=(n, k))
