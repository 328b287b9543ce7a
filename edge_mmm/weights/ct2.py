"""Reader for CTranslate2's `model.bin` (the format faster-whisper uses).

Layout (little-endian; strings are a u16 length that counts a trailing NUL, then the bytes and the NUL):
    u32 binary_version; [v>=2] str spec_name, u32 spec_revision; u32 num_variables;
    per variable: str name, u8 rank, u32 dims[rank],
                  [v>=4] u8 dtype_id, u32 num_bytes | [v<4] u8 item_size, u32 num_elements; raw C-order data
    [v>=3] u32 num_aliases; per alias: str alias, str target
Source of the layout: ctranslate2/specs/model_spec.py (`_serialize`).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import numpy as np

from edge_mmm.errors import ModelFileError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_ITEM_SIZE_DTYPES = {4: np.float32, 2: np.float16, 1: np.int8}
MAX_BINARY_VERSION = 6


@dataclass
class CT2Model:
    spec_name: str
    spec_revision: int
    variables: Dict[str, np.ndarray]
    aliases: Dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following aliases (e.g. a tied output projection)."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(name)
        return self.variables[name]


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated or corrupt CTranslate2 model (needed {n} bytes at "
                                 f"offset {self.pos}, file has {len(self.buf)})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        n = self.u16()
        raw = bytes(self.take(n))
        if n == 0 or raw[-1] != 0:
            raise ModelFileError(f"{self.path}: corrupt string at offset {self.pos - n}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"{self.path}: corrupt string at offset {self.pos - n}") from exc


def read_ct2_model(path: Path) -> CT2Model:
    """Parse a CTranslate2 `model.bin` fully into numpy arrays (copies; the file is closed afterwards)."""
    return _read(Path(path), header_only=False)


def read_ct2_header(path: Path) -> CT2Model:
    """The variables' shapes without their data: `variables` holds zero-stride views of the right shape and
    dtype (no memory behind them), except scalars (rank 0, e.g. `num_heads`), whose values are read. The
    file is memory-mapped, so only the pages holding the headers are read (a few KB of a 75 MB tiny.en)."""
    return _read(Path(path), header_only=True)


def _read(path: Path, header_only: bool) -> CT2Model:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read CTranslate2 model {path}: {exc}") from exc
    view = memoryview(data)
    try:
        return _parse(_Cursor(view, path), path, header_only)
    finally:
        view.release()
        if isinstance(data, mmap.mmap):
            try:
                data.close()
            except BufferError:  # a slice is still held by the error's traceback: the map goes with it
                pass


def _parse(cur: _Cursor, path: Path, header_only: bool) -> CT2Model:
    version = cur.u32()
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ModelFileError(f"{path}: not a CTranslate2 model.bin (binary version {version}, "
                             f"supported 1..{MAX_BINARY_VERSION})")
    spec_name, spec_revision = ("", 1)
    if version >= 2:
        spec_name, spec_revision = cur.string(), cur.u32()
    variables: Dict[str, np.ndarray] = {}
    for _ in range(cur.u32()):
        name = cur.string()
        rank = cur.u8()
        dims = [cur.u32() for _ in range(rank)]
        if version >= 4:
            dtype_id = cur.u8()
            if dtype_id not in _DTYPES:
                raise ModelFileError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
            dtype = _DTYPES[dtype_id]
            nbytes = cur.u32()
        else:
            item = cur.u8()
            if item not in _ITEM_SIZE_DTYPES:
                raise ModelFileError(f"{path}: variable {name} has unsupported item size {item}")
            dtype = _ITEM_SIZE_DTYPES[item]
            nbytes = cur.u32() * item
        raw = cur.take(nbytes)
        if header_only and rank > 0:
            variables[name] = _shape_only(dtype, dims, nbytes, name, path)
        else:
            variables[name] = _to_array(raw, dtype, dims, name, path)
    aliases: Dict[str, str] = {}
    if version >= 3:
        for _ in range(cur.u32()):
            alias, target = cur.string(), cur.string()
            aliases[alias] = target
    if cur.pos != len(cur.buf):
        raise ModelFileError(f"{path}: {len(cur.buf) - cur.pos} unexpected trailing bytes; corrupt model.bin")
    return CT2Model(spec_name, spec_revision, variables, aliases)


def _shape_only(dtype, dims, nbytes: int, name: str, path: Path) -> np.ndarray:
    """A read-only array of shape `dims` backed by one element: the shape and dtype, checked against the
    byte count, without touching the data."""
    np_dtype = np.dtype(np.float32 if dtype == "bfloat16" else dtype)
    count = int(np.prod(dims))
    item = 2 if dtype == "bfloat16" else np_dtype.itemsize
    if count * item != nbytes:
        raise ModelFileError(f"{path}: variable {name} holds {nbytes} bytes, its shape {dims} needs {count * item}")
    return np.lib.stride_tricks.as_strided(np.zeros(1, np_dtype), shape=dims, strides=[0] * len(dims),
                                           writeable=False)


def _to_array(raw: memoryview, dtype, dims, name: str, path: Path) -> np.ndarray:
    count = int(np.prod(dims)) if dims else 1
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        arr = bits.view(np.float32)
    else:
        arr = np.frombuffer(raw, dtype=dtype).copy()
    if arr.size != count:
        raise ModelFileError(f"{path}: variable {name} holds {arr.size} values, its shape {dims} needs {count}")
    return arr.reshape(dims)
