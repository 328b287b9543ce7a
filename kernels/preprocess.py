"""Camera frame -> vision-encoder input in one pass: bilinear resize + BGR->RGB + rescale + normalize.

    out[c, y, x] = (bilinear(frame[..., 2 - c])(y, x) / 255 - mean[c]) / std[c]     (BGR input)

Bilinear with half-pixel centers and edge clamping, exactly `F.interpolate(mode="bilinear",
align_corners=False, antialias=False)`. This is the live-camera fast path: it does not reproduce the HF
Idefics3 processor (PIL LANCZOS on uint8, then rounding); edge_mmm.vision.processor does that on CPU.
The frame may be any strided uint8 `[H, W, 3]` view (a crop of a larger buffer); it is never copied.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from edge_mmm.errors import InputError
from edge_mmm.kernels.dispatch import FLOAT_DTYPES, cdiv, check_tensor, jit, use_triton

tl = None  # triton.language, bound by dispatch.jit on first launch

BLOCK = 256


@jit
def _preprocess_image_kernel(IMG, OUT, H, W, OH, OW, scale_y, scale_x, s_h, s_w, s_c,
                             a0, a1, a2, b0, b1, b2,
                             BGR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < OH * OW
    oy = offs // OW
    ox = offs % OW
    sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_y - 0.5, 0.0)
    sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_x - 0.5, 0.0)
    y0 = tl.minimum(sy.to(tl.int32), H - 1)  # sy >= 0, so truncation is floor
    x0 = tl.minimum(sx.to(tl.int32), W - 1)
    y1 = tl.minimum(y0 + 1, H - 1)
    x1 = tl.minimum(x0 + 1, W - 1)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    p00 = IMG + y0.to(tl.int64) * s_h + x0.to(tl.int64) * s_w
    p01 = IMG + y0.to(tl.int64) * s_h + x1.to(tl.int64) * s_w
    p10 = IMG + y1.to(tl.int64) * s_h + x0.to(tl.int64) * s_w
    p11 = IMG + y1.to(tl.int64) * s_h + x1.to(tl.int64) * s_w
    plane = OH * OW
    for c in tl.static_range(3):
        if BGR:
            src = (2 - c) * s_c
        else:
            src = c * s_c
        v00 = tl.load(p00 + src, mask=ok, other=0).to(tl.float32)
        v01 = tl.load(p01 + src, mask=ok, other=0).to(tl.float32)
        v10 = tl.load(p10 + src, mask=ok, other=0).to(tl.float32)
        v11 = tl.load(p11 + src, mask=ok, other=0).to(tl.float32)
        top = v00 + (v01 - v00) * lx
        bottom = v10 + (v11 - v10) * lx
        v = top + (bottom - top) * ly
        if c == 0:
            y = v * a0 + b0
        elif c == 1:
            y = v * a1 + b1
        else:
            y = v * a2 + b2
        tl.store(OUT + c * plane + offs, y.to(OUT.dtype.element_ty), mask=ok)


def _size(size) -> Tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise InputError(f"preprocess_image: size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def preprocess_image_reference(frame: torch.Tensor, size, mean: Sequence[float], std: Sequence[float],
                               bgr: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch: channel swap, float32 bilinear F.interpolate (no antialias), /255, normalize -> `[3, h, w]`."""
    oh, ow = _size(size)
    x = frame.permute(2, 0, 1).float()
    if bgr:
        x = x.flip(0)
    x = torch.nn.functional.interpolate(x[None], size=(oh, ow), mode="bilinear", align_corners=False,
                                        antialias=False)[0]
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return ((x / 255.0 - m) / s).to(dtype)


def preprocess_image(frame: torch.Tensor, size: Union[int, Tuple[int, int]], mean: Sequence[float],
                     std: Sequence[float], bgr: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 `[H, W, 3]` frame (BGR, or RGB with bgr=False) -> normalized `[3, h, w]` in `dtype`."""
    op = "preprocess_image"
    check_tensor(op, "frame", frame, ndim=(3,), dtypes=(torch.uint8,))
    if frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"{op}: frame must be a non-empty [H, W, 3] image, got {tuple(frame.shape)}")
    oh, ow = _size(size)
    if len(mean) != 3 or len(std) != 3 or any(float(s) == 0.0 for s in std):
        raise InputError(f"{op}: mean and std need 3 values each (std non-zero), got {mean!r}, {std!r}")
    if dtype not in FLOAT_DTYPES:
        raise InputError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    if not use_triton(frame):
        return preprocess_image_reference(frame, (oh, ow), mean, std, bgr, dtype)
    h, w, _ = frame.shape
    out = torch.empty((3, oh, ow), dtype=dtype, device=frame.device)
    # (v / 255 - mean) / std == v * a + b
    a = [1.0 / (255.0 * float(s)) for s in std]
    b = [-float(m) / float(s) for m, s in zip(mean, std)]
    _preprocess_image_kernel[(cdiv(oh * ow, BLOCK),)](
        frame, out, h, w, oh, ow, h / oh, w / ow, *frame.stride(), *a, *b, BGR=bgr, BLOCK=BLOCK)
    return out
