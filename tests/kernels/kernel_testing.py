"""Shared helpers of the kernel tests (imported by name: pytest puts this folder on sys.path)."""

import torch

# CPU (Triton interpreter) here; CUDA when a GPU is present.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Per-dtype (atol, rtol) for elementwise / normalization outputs compared with a float32-computing
# reference: fp32 agrees to rounding; fp16/bf16 to about one ulp of the output dtype.
ELEMENTWISE_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """allclose with a message that shows the worst element, both values and the tolerances."""
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what} dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.float().cpu(), expected.float().cpu()
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if not bool((err <= bound).all()) or torch.isnan(a).any() != torch.isnan(e).any():
        idx = int((err - bound).flatten().argmax())
        raise AssertionError(f"{what} mismatch: max |diff| {err.max().item():.3g} at flat index {idx} "
                             f"(got {a.flatten()[idx].item():.6g}, want {e.flatten()[idx].item():.6g}); "
                             f"atol={atol}, rtol={rtol}")
