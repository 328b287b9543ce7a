"""The packed weight-only quantized layout (see docs/quantization.md), as one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from edge_mmm.errors import ModelFileError
# The layout's arithmetic lives with the kernels that read it (one floor down); this module validates and
# carries the tensors. SYMMETRIC_INT4_ZERO: the code that dequantizes to 0 in the scale-only INT4 form (Q4_0).
from edge_mmm.kernels.quant_matmul import SYMMETRIC_INT4_ZERO, dequantize_reference, unpack_codes  # noqa: F401

SUPPORTED_BITS = (4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def num_groups(k: int, group_size: int) -> int:
    """Number of groups along K; the last one may be partial (it is padded in storage)."""
    return -(-k // group_size)


@dataclass
class PackedWeight:
    """A weight `W[N, K]` in the packed layout: codes, per-group scales and optional per-group offsets.

    `shape` is the logical `(N, K)`. K is padded up to a whole number of groups in storage, so
    `qweight` is `[N, Kp // 2]` (uint8, INT4) or `[N, Kp]` (int8, INT8) with `Kp = G * group_size`
    and `scales` / `zeros` are `[N, G]`, `G = ceil(K / group_size)`.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    shape: Tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    @classmethod
    def trusted(cls, qweight, scales, zeros, bits: int, group_size: int, shape) -> "PackedWeight":
        """Build without validation, for hot paths whose tensors were validated once already."""
        self = object.__new__(cls)
        self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.bits, self.group_size, self.shape = bits, group_size, shape
        return self

    # ------------------------------------------------------------------ properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def n_groups(self) -> int:
        return num_groups(self.shape[1], self.group_size)

    @property
    def padded_in_features(self) -> int:
        return self.n_groups * self.group_size

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors (what the weight costs in memory)."""
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check dtypes and shapes against the layout; raise ModelFileError naming the field."""
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ModelFileError(f"packed weight: shape must be (N, K) with N, K > 0, got {self.shape}")
        if self.bits not in SUPPORTED_BITS:
            raise ModelFileError(f"packed weight: bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size <= 0 or (self.bits == 4 and self.group_size % 2):
            raise ModelFileError(f"packed weight: group_size must be a positive (even for INT4) integer, "
                                 f"got {self.group_size}")
        n = self.shape[0]
        g = self.n_groups
        if self.bits == 4:
            want_dtype, want_q = torch.uint8, (n, self.padded_in_features // 2)
        else:
            want_dtype, want_q = torch.int8, (n, self.padded_in_features)
        if self.qweight.dtype != want_dtype:
            raise ModelFileError(f"packed weight: INT{self.bits} qweight must be {want_dtype}, "
                                 f"got {self.qweight.dtype}")
        if tuple(self.qweight.shape) != want_q:
            raise ModelFileError(f"packed weight: qweight shape {tuple(self.qweight.shape)} does not match "
                                 f"{want_q} for shape {self.shape}, group_size {self.group_size}")
        if self.scales.dtype not in SCALE_DTYPES:
            raise ModelFileError(f"packed weight: scales dtype must be float16/bfloat16/float32, "
                                 f"got {self.scales.dtype}")
        if tuple(self.scales.shape) != (n, g):
            raise ModelFileError(f"packed weight: scales shape {tuple(self.scales.shape)} != {(n, g)}")
        if self.zeros is not None:
            if self.bits == 8:
                raise ModelFileError("packed weight: INT8 is symmetric; zeros must be None")
            if self.zeros.dtype != self.scales.dtype:
                raise ModelFileError(f"packed weight: zeros dtype {self.zeros.dtype} != scales dtype "
                                     f"{self.scales.dtype}")
            if tuple(self.zeros.shape) != (n, g):
                raise ModelFileError(f"packed weight: zeros shape {tuple(self.zeros.shape)} != {(n, g)}")
        devices = {t.device for t in (self.qweight, self.scales, self.zeros) if t is not None}
        if len(devices) != 1:
            raise ModelFileError(f"packed weight: tensors are on different devices {sorted(map(str, devices))}")

    # ------------------------------------------------------------------ use
    def codes(self) -> torch.Tensor:
        """Unsigned INT4 codes 0..15 (uint8) or signed INT8 codes (int8), `[N, Kp]`, padding included."""
        return unpack_codes(self.qweight, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight `[N, K]`; computed in float32 (bit-exact with GGUF's reference), then cast."""
        w = dequantize_reference(self.qweight, self.scales, self.zeros, self.group_size, self.bits, self.shape[1])
        return w.to(dtype)

    def to(self, device=None, scale_dtype: Optional[torch.dtype] = None) -> "PackedWeight":
        """A copy on `device`, with scales/zeros converted to `scale_dtype` if given."""
        def conv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=scale_dtype) if scale_dtype is not None else t.to(device)

        return PackedWeight(self.qweight.to(device), conv(self.scales), conv(self.zeros),
                            self.bits, self.group_size, self.shape)
