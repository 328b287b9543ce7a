"""Which implementation a kernel op runs: our Triton kernel or its plain PyTorch reference.

Modes (set once, e.g. by the CLI from a flag or the EDGE_MMM_KERNELS setting):
- "auto" (default): Triton for CUDA tensors when `triton` imports, the reference otherwise;
- "reference": always the reference (to compare, or to rule the kernels out);
- "triton": always Triton; CPU tensors are allowed only under the Triton interpreter
  (TRITON_INTERPRET=1, how the tests run the kernels on a machine without a GPU).

Triton is imported lazily, on the first launch: `edge_mmm` imports (and every CPU path works)
without it. Kernels are declared with `@jit` below instead of `@triton.jit`, which applies
`triton.jit` at that first launch, when TRITON_INTERPRET is known.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch

from edge_mmm.errors import DeviceError, InputError, MissingExtraError

MODES = ("auto", "reference", "triton")
_mode = "auto"
_triton_modules = None  # (triton, triton.language) once imported, False when the import failed


def set_kernel_mode(mode: str) -> None:
    """Select "auto", "reference" or "triton" for every kernel op in this process."""
    global _mode
    if mode not in MODES:
        raise InputError(f"kernel mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_kernel_mode() -> str:
    return _mode


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Run a block with another kernel mode, restoring the previous one afterwards."""
    previous = _mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set by the tests)."""
    # The one environment variable read below the CLI edge: it is Triton's own switch, not a setting of ours.
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _import_triton():
    global _triton_modules
    if _triton_modules is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _triton_modules = False
        else:
            _triton_modules = (triton, tl)
    return _triton_modules


def triton_available() -> bool:
    """True when the `triton` package imports."""
    return bool(_import_triton())


def use_triton(*tensors: Optional[torch.Tensor]) -> bool:
    """Decide, for one call, whether the Triton kernel runs (True) or the reference (False)."""
    if _mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if _mode == "auto":
        return on_cuda and triton_available()
    # mode "triton": an explicit request, so failures are errors, never silent fallbacks.
    if not triton_available():
        raise MissingExtraError("triton", "cuda", "kernel mode 'triton'")
    if not on_cuda and not interpreting():
        raise DeviceError("kernel mode 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                          "kernels in Triton's CPU interpreter)")
    return True


class _LazyKernel:
    """A kernel function that becomes a `triton.jit` function on its first launch."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._built = {}  # interpreting() -> JITFunction / InterpretedFunction

    def build(self):
        modules = _import_triton()
        if not modules:
            raise MissingExtraError("triton", "cuda", f"kernel {self.__name__}")
        triton, tl = modules
        key = interpreting()
        if key not in self._built:
            # The kernel bodies name `tl` as a module global; bind it now that triton is imported.
            if self.fn.__globals__.get("tl") is None:
                self.fn.__globals__["tl"] = tl
            # Device functions a kernel calls (`@jit` helpers named as globals, e.g. online_softmax's
            # `attend_block`) must be Triton functions when the kernel is compiled: build them first and
            # bind the built function under the name the kernel body uses.
            for name in self.fn.__code__.co_names:
                dep = self.fn.__globals__.get(name)
                if isinstance(dep, _LazyKernel):
                    self.fn.__globals__[name] = dep.build()
            self._built[key] = triton.jit(self.fn)
        return self._built[key]

    def __getitem__(self, grid):
        return self.build()[grid]


def jit(fn) -> _LazyKernel:
    """Decorator for kernels: `triton.jit`, applied on first launch (see module docstring)."""
    return _LazyKernel(fn)


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` on `dtype` operands must run in float32 ("ieee" precision).

    Always for float32 (TF32 would lose the reference's accuracy). For bfloat16 only in the interpreter:
    Triton 3.9's interpreter multiplies bf16 tiles as raw uint16 bits, so the tests upcast there; on a
    GPU the bf16 tiles go to the tensor cores.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------- checks
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t, *, ndim: Optional[Sequence[int]] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> None:
    """Raise InputError naming `op` and `name` unless `t` is a tensor of an allowed rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in tuple(ndim):
        want = " or ".join(str(n) for n in ndim)
        raise InputError(f"{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise InputError(f"{op}: {name} must be one of ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Raise InputError when the given tensors do not all live on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise InputError(f"{op}: all tensors must be on one device, got {listing}")


def check_contiguous(op: str, name: str, t: torch.Tensor, why: str) -> None:
    """Reject a non-contiguous tensor that must not be copied on every call (weights, caches)."""
    if not t.is_contiguous():
        raise InputError(f"{op}: {name} must be contiguous ({why}); call .contiguous() once when you "
                         f"load it, got strides {tuple(t.stride())} for shape {tuple(t.shape)}")
