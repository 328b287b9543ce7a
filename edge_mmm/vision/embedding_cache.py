"""Image-embedding cache: LM-space image features keyed by a content hash of the preprocessed pixels.

The key is BLAKE2b over the model id, the tensor shapes and the bytes of `pixel_values` and
`pixel_attention_mask` (after resize/split/normalize), so the same picture asked about twice, or an
unchanged camera scene, skips the vision encoder. Bounded LRU by entry count and by total bytes.

Preprocessing a large photo (LANCZOS resizes, up to 17 tiles) costs more than hashing it, so the cache also
keeps a small index from the decoded source image (+ processor settings) to its pixel key and tile grid:
a repeat of the same decoded image skips preprocessing as well. The index only points into the main
cache; an evicted entry is recomputed from the pixels as usual.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch


def content_key(tag: str, *arrays) -> str:
    """BLAKE2b-128 of `tag` and each array's dtype, shape and bytes (numpy or torch; None allowed)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(tag.encode())
    for arr in arrays:
        if arr is None:
            h.update(b"none")
            continue
        a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def pixels_key(model_id: str, pixel_values, pixel_attention_mask=None) -> str:
    """Content hash of preprocessed pixels for one model: the cache key."""
    return content_key(model_id, pixel_values, pixel_attention_mask)


@dataclass
class SourceEntry:
    """What preprocessing a known source image produced: its pixel key and tile grid."""

    pixel_key: str
    rows: List[int]
    cols: List[int]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ImageEmbeddingCache:
    """LRU map key -> features tensor, at most `max_entries` entries and `max_bytes` bytes."""

    def __init__(self, max_entries: int = 16, max_bytes: int = 256 * 2 ** 20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._sources: "OrderedDict[str, SourceEntry]" = OrderedDict()
        self._bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> Optional[torch.Tensor]:
        value = self._items.get(key)
        if value is None:
            self.stats.misses += 1
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.element_size() * value.nelement()
        if size > self.max_bytes or self.max_entries <= 0:
            return  # larger than the whole cache: not worth evicting everything for
        if key in self._items:
            self._bytes -= self._size(self._items.pop(key))
        self._items[key] = value
        self._bytes += size
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= self._size(old)
            self.stats.evictions += 1

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> "tuple[torch.Tensor, bool]":
        """(features, hit): the cached value, or `compute()` stored under `key`."""
        value = self.get(key)
        if value is not None:
            return value, True
        value = compute()
        self.put(key, value)
        return value, False

    def remember_source(self, source_key: str, entry: SourceEntry) -> None:
        self._sources[source_key] = entry
        self._sources.move_to_end(source_key)
        while len(self._sources) > 4 * max(self.max_entries, 1):
            self._sources.popitem(last=False)

    def lookup_source(self, source_key: str) -> Optional["tuple[SourceEntry, torch.Tensor]"]:
        """(entry, features) when this source image was processed before and its features are cached."""
        entry = self._sources.get(source_key)
        if entry is None or entry.pixel_key not in self._items:
            return None
        self._sources.move_to_end(source_key)
        return entry, self.get(entry.pixel_key)

    def clear(self) -> None:
        self._items.clear()
        self._sources.clear()
        self._bytes = 0

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.element_size() * t.nelement()
