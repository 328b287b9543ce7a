"""The frame selector: which camera frame a spoken question is about, and whether the scene changed.

Policy (stated once, used by the turn manager):
- Candidates are the frames captured while the user spoke (from `FRAME_LEAD_S` before speech start to
  end of speech), sampled at most every `sample_every_s` into a short history.
- Among them the newest frame whose sharpness (variance of the Laplacian of a small gray thumbnail) is
  at least `SHARP_RATIO` of the sharpest candidate wins: the latest view, unless motion blurred it.
- No candidate (a typed question, a camera that just stalled): the latest frame if it is younger than
  `max_age_s`, else no image.
- Scene change: the chosen frame is compared with the last frame the model saw (mean absolute difference
  of 32x24 gray thumbnails, 0-255). Below `scene_threshold` the old frame is reused as is, so its image
  embedding (content-hash cache) and the conversation's KV cache stay valid despite sensor noise.
"""

from __future__ import annotations

import io
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from edge_mmm.errors import InputError

SHARP_RATIO = 0.5
FRAME_LEAD_S = 0.5
THUMB = (24, 32)  # rows, cols of the scene-change thumbnail


def _gray(frame: np.ndarray, max_side: int) -> np.ndarray:
    step = max(1, max(frame.shape[:2]) // max_side)
    small = frame[::step, ::step].astype(np.float32)
    return small.mean(axis=2) if small.ndim == 3 else small


def sharpness(frame: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a ~160 px gray thumbnail (higher = sharper)."""
    g = _gray(frame, 160)
    if min(g.shape) < 3:
        return 0.0
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """32x24 gray block means (a cheap scene fingerprint)."""
    g = _gray(frame, 256)
    rows, cols = THUMB
    h, w = (g.shape[0] // rows) * rows, (g.shape[1] // cols) * cols
    if h == 0 or w == 0:
        return np.resize(g, THUMB)
    return g[:h, :w].reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3))


def scene_difference(a: np.ndarray, b: Optional[np.ndarray]) -> float:
    """Mean absolute difference of two thumbnails (0-255); inf when there is nothing to compare with."""
    if b is None or a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).mean())


def check_frame(frame) -> np.ndarray:
    """A BGR uint8 HxWx3 (or gray HxW) frame, else InputError."""
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or min(arr.shape[:2]) < 8:
        raise InputError(f"a frame must be a uint8 BGR array HxWx3 (or HxW gray), at least 8x8; got "
                         f"{arr.dtype} {arr.shape}")
    return arr


@dataclass
class Frame:
    image: np.ndarray  # BGR uint8
    t: float  # monotonic capture time
    seq: int
    sharpness: float


class FrameStore:
    """The latest frame plus a short sampled history; written by a grabber, read by the turn manager."""

    def __init__(self, history: int = 16, sample_every_s: float = 0.25, max_age_s: float = 2.0):
        self._lock = threading.Lock()
        self._history: "deque[Frame]" = deque(maxlen=history)
        self._latest: Optional[Frame] = None
        self.sample_every_s = sample_every_s
        self.max_age_s = max_age_s
        self.received = 0

    def put(self, image: np.ndarray, t: Optional[float] = None) -> None:
        image = check_frame(image)
        frame = Frame(image, time.monotonic() if t is None else t, self.received, sharpness(image))
        with self._lock:
            self.received += 1
            self._latest = frame
            if not self._history or frame.t - self._history[-1].t >= self.sample_every_s:
                self._history.append(frame)

    def latest(self) -> Optional[Frame]:
        with self._lock:
            return self._latest

    def select(self, start_t: Optional[float], end_t: Optional[float]) -> Optional[Frame]:
        """The frame for a question spoken between `start_t` and `end_t` (monotonic), per the module policy."""
        now = time.monotonic()
        with self._lock:
            latest = self._latest
            cands = list(self._history)
            if latest is not None and (not cands or cands[-1] is not latest):
                cands.append(latest)
        if start_t is not None and end_t is not None:
            cands = [f for f in cands if start_t - FRAME_LEAD_S <= f.t <= end_t]
            if cands:
                best = max(f.sharpness for f in cands)
                return [f for f in cands if f.sharpness >= SHARP_RATIO * best][-1]
        if latest is not None and now - latest.t <= self.max_age_s:
            return latest
        return None

    def jpeg(self, quality: int = 80) -> Optional[bytes]:
        """The latest frame as JPEG bytes (for previews), or None before the first frame."""
        from PIL import Image

        frame = self.latest()
        if frame is None:
            return None
        img = frame.image
        rgb = img[:, :, ::-1] if img.ndim == 3 else img
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


class SceneTracker:
    """Reuse the last frame the model saw while the scene has not changed (see the module policy)."""

    def __init__(self, threshold: float = 8.0):
        if threshold < 0:
            raise InputError(f"scene_threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self._image: Optional[np.ndarray] = None
        self._thumb: Optional[np.ndarray] = None

    def choose(self, image: np.ndarray) -> Tuple[np.ndarray, bool, float]:
        """(image to show the model, scene changed, difference); a changed scene becomes the one seen."""
        chosen, changed, diff = self.peek(image)
        if changed:
            self.commit(image)
        return chosen, changed, diff

    def peek(self, image: np.ndarray) -> Tuple[np.ndarray, bool, float]:
        """As `choose`, without remembering the image (speculative work while the user still speaks)."""
        diff = scene_difference(thumbnail(image), self._thumb)
        if diff < self.threshold:
            return self._image, False, diff
        return image, True, diff

    def commit(self, image: np.ndarray) -> None:
        """`image` is now the scene the model saw."""
        self._image, self._thumb = image, thumbnail(image)

    def reset(self) -> None:
        self._image = self._thumb = None
