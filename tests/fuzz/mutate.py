"""Deterministic byte mutations for the loader fuzz tests: a seeded RNG picks 1-4 edits per case.

Edits favour the first `hot` bytes (headers, metadata, tables of contents), where a parser makes its
decisions; the rest of a file is mostly tensor or sample data that a parser copies without reading.
"""

from __future__ import annotations

import random
import struct
from typing import List, Tuple

INTERESTING_U32 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
                   0xFFFFFFFF)
INTERESTING_U64 = (0, 1, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 64 - 1)


def _pos(rng: random.Random, n: int, hot: int) -> int:
    if n == 0:
        return 0
    if hot and rng.random() < 0.75:
        return rng.randrange(min(hot, n))
    return rng.randrange(n)


def mutate(data: bytes, rng: random.Random, hot: int = 0) -> Tuple[bytes, List[str]]:
    """`data` with 1-4 random edits, and what was done (to name a failing case)."""
    buf = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        i = _pos(rng, len(buf), hot)
        if op == 0 and buf:
            bit = rng.randrange(8)
            buf[min(i, len(buf) - 1)] ^= 1 << bit
            done.append(f"flip {i}.{bit}")
        elif op == 1 and buf:
            buf[min(i, len(buf) - 1)] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            done.append(f"byte {i}")
        elif op == 2 and len(buf) >= 4:
            i = min(i, len(buf) - 4)
            buf[i:i + 4] = struct.pack("<I", rng.choice(INTERESTING_U32))
            done.append(f"u32 {i}")
        elif op == 3 and len(buf) >= 8:
            i = min(i, len(buf) - 8)
            buf[i:i + 8] = struct.pack("<Q", rng.choice(INTERESTING_U64))
            done.append(f"u64 {i}")
        elif op == 4:
            cut = rng.randrange(len(buf) + 1) if rng.random() < 0.5 else _pos(rng, len(buf), hot)
            del buf[cut:]
            done.append(f"truncate {cut}")
        elif op == 5:
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            buf[i:i] = junk
            done.append(f"insert {len(junk)}@{i}")
        elif op == 6 and buf:
            n = rng.randint(1, min(64, len(buf)))
            del buf[i:i + n]
            done.append(f"delete {n}@{i}")
        elif op == 7 and buf:
            j = rng.randrange(len(buf))
            n = rng.randint(1, 256)
            buf[i:i] = buf[j:j + n]
            done.append(f"duplicate {n} {j}->{i}")
        elif op == 8 and len(buf) > 1:
            j = _pos(rng, len(buf), hot)
            buf[i], buf[j] = buf[j], buf[i]
            done.append(f"swap {i},{j}")
    return bytes(buf), done
