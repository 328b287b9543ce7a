"""ImageEmbeddingCache: content keys, LRU order, entry and byte bounds."""

import numpy as np
import torch

from edge_mmm.vision.embedding_cache import ImageEmbeddingCache, pixels_key


def test_key_depends_on_pixels_mask_and_model():
    pv = np.zeros((1, 2, 3, 8, 8), np.float32)
    mask = np.ones((1, 2, 8, 8), np.int64)
    k = pixels_key("m", pv, mask)
    assert k == pixels_key("m", pv.copy(), torch.from_numpy(mask))  # numpy or torch, same content
    pv2 = pv.copy()
    pv2[0, 1, 2, 7, 7] = 1e-6
    assert k != pixels_key("m", pv2, mask)
    assert k != pixels_key("other-model", pv, mask)
    mask2 = mask.copy()
    mask2[0, 0, 0, 0] = 0
    assert k != pixels_key("m", pv, mask2)


def test_lru_bounds():
    c = ImageEmbeddingCache(max_entries=2, max_bytes=10_000)
    a, b, d = (torch.zeros(10, 10) for _ in range(3))  # 400 bytes each
    c.put("a", a)
    c.put("b", b)
    assert c.get("a") is a  # a is now most recent
    c.put("d", d)
    assert c.get("b") is None and c.get("a") is a and len(c) == 2
    assert c.stats.evictions == 1 and c.stats.hits == 2 and c.stats.misses == 1
    big = ImageEmbeddingCache(max_entries=10, max_bytes=1000)
    big.put("x", torch.zeros(200))  # 800 bytes
    big.put("y", torch.zeros(200))  # over the byte bound: x evicted
    assert big.get("x") is None and big.nbytes == 800
    big.put("huge", torch.zeros(1000))  # larger than the whole cache: not stored
    assert big.get("huge") is None and big.get("y") is not None


def test_get_or_compute_counts():
    c = ImageEmbeddingCache()
    calls = []
    value, hit = c.get_or_compute("k", lambda: calls.append(1) or torch.ones(3))
    again, hit2 = c.get_or_compute("k", lambda: calls.append(1) or torch.ones(3))
    assert (hit, hit2) == (False, True) and len(calls) == 1 and again is value
