"""The file pair the C kernel's weights travel in (the LM's `cpu_lm.*`, Whisper's `decoder_pack.*`): a JSON
index, `{"arrays": {name: [dtype, shape, byte offset]}, ...the writer's own fields}`, and a binary file of the
arrays, each at a 64-byte aligned offset. Torch-free: the writers (exporters/) and readers (runners/) share it.
The readers check each array's dtype and shape against what their kernel reads before the C code sees it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np

ALIGN = 64


def write_array_pack(json_path: Path, bin_path: Path, meta: dict, arrays: Mapping[str, np.ndarray]) -> None:
    """`arrays` into `bin_path` (in order, aligned) and `meta` + their index into `json_path`."""
    index = {}
    offset = 0
    with open(bin_path, "wb") as f:
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            index[name] = [a.dtype.str, list(a.shape), offset]
            f.write(a.tobytes())
            offset += a.nbytes
    Path(json_path).write_text(json.dumps({**meta, "arrays": index}, indent=1))


def read_array_pack(json_path: Path, bin_path: Path) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(the index's other fields, name -> read-only array over the mapped file); ValueError naming the
    file when the index is not one or an array does not lie inside the binary file."""
    try:
        meta = json.loads(Path(json_path).read_text())
    except ValueError as exc:
        raise ValueError(f"{json_path}: not JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays", {}), dict):
        raise ValueError(f"{json_path}: not an array pack index")
    index = meta.pop("arrays", {})
    # mapped, not read: a load touches no page (Whisper's 57 MB pack: 0.26 s less than reading it), the kernel
    # pages it in as it runs, and processes share the page cache; cache entries and bundles are never rewritten
    blob = np.memmap(bin_path, dtype=np.uint8, mode="r") if index and Path(bin_path).stat().st_size \
        else np.zeros(0, np.uint8)
    arrays = {}
    for name, entry in index.items():
        try:
            dtype, shape, offset = entry
            dt, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"{json_path}: array {name}: not [dtype, shape, offset]: {entry!r}") from None
        if dt.kind not in "fiu" or any(s < 0 for s in shape):
            raise ValueError(f"{json_path}: array {name}: bad dtype or shape {entry!r}")
        nbytes = int(np.prod(shape)) * dt.itemsize
        if not isinstance(offset, int) or offset < 0 or offset % dt.alignment or offset + nbytes > blob.size:
            raise ValueError(f"{bin_path}: array {name} runs past the end of the file")
        arrays[name] = blob[offset:offset + nbytes].view(dt).reshape(shape)
    return meta, arrays
