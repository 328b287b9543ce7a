"""Which torch device a backend may run on: shared by the speech and language loaders."""

from __future__ import annotations

from edge_mmm.errors import DeviceError, InputError


def check_device(device: str, backend: str) -> str:
    """`device` is "cpu" or a CUDA device ("cuda", "cuda:N"); CUDA needs the torch backend and a GPU."""
    if device == "cpu":  # the onnxruntime loaders run without torch: nothing to ask it
        return device
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device must be cpu or cuda[:N], got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda":
        if backend != "torch":
            raise InputError(f"--device {device} needs --backend torch (the {backend} backend here runs on the CPU)")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA GPU is visible to torch on this machine")
    return device
