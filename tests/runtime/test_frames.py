"""Frame selection policy (newest sharp frame of the utterance; latest if recent) and scene-change reuse."""

import time

import numpy as np
import pytest

skdata = pytest.importorskip("skimage.data")

from edge_mmm.errors import InputError  # noqa: E402
from edge_mmm.runtime.frames import FrameStore, SceneTracker, sharpness  # noqa: E402


def _photo(name="astronaut", size=128):
    img = getattr(skdata, name)()[:, :, ::-1]
    step = img.shape[0] // size
    return np.ascontiguousarray(img[::step, ::step][:size, :size])


def _blur(img, k=9):
    out = img.astype(np.float32)
    for axis in (0, 1):
        out = sum(np.roll(out, s, axis=axis) for s in range(-(k // 2), k // 2 + 1)) / k
    return out.astype(np.uint8)


def test_sharpness_orders_blur():
    img = _photo()
    assert sharpness(img) > 4 * sharpness(_blur(img))


def test_select_prefers_newest_sharp_frame_of_the_utterance():
    store = FrameStore(history=8, sample_every_s=0.0, max_age_s=10)
    t0 = time.monotonic() - 5.0
    sharp_old, sharp_new = _photo("astronaut"), _photo("coffee")  # similar sharpness
    store.put(_photo("chelsea"), t0 - 5.0)  # before the utterance
    store.put(sharp_old, t0 + 0.1)
    store.put(sharp_new, t0 + 0.2)
    store.put(_blur(_photo("rocket")), t0 + 0.3)  # newest, but motion blurred
    chosen = store.select(t0, t0 + 0.4)
    assert chosen.image is sharp_new
    # no frame in the window (typed question): the latest frame, while it is recent enough
    assert store.select(None, None).seq == 3
    store.max_age_s = 1.0
    assert store.select(None, None) is None


def test_jpeg_preview_and_bad_frames():
    store = FrameStore()
    assert store.jpeg() is None
    store.put(_photo())
    assert store.jpeg()[:2] == b"\xff\xd8"
    with pytest.raises(InputError, match="uint8 BGR"):
        store.put(np.zeros((64, 64, 3), np.float32))


def test_scene_tracker_reuses_frame_under_noise_and_switches_on_change():
    rng = np.random.default_rng(0)
    tracker = SceneTracker(threshold=8.0)
    a = _photo("chelsea")
    img, changed, _ = tracker.choose(a)
    assert changed and img is a
    noisy = np.clip(a.astype(np.int16) + rng.integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
    img, changed, diff = tracker.choose(noisy)
    assert not changed and img is a and diff < 8.0  # same scene: the old frame (same embedding) is reused
    b = _photo("coffee")
    img, changed, diff = tracker.choose(b)
    assert changed and img is b and diff > 8.0
