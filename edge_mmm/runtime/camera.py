"""Camera input through OpenCV: a grabber thread that always holds the latest frame.

Sources: a V4L2 index ("0") or device path ("/dev/video0"), a GStreamer pipeline (any string with "!",
e.g. Jetson CSI: "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv !
video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1"), a stream URL with
one of STREAM_SCHEMES (any other `scheme:` -- file:, concat:, data:, subfile: ... -- is refused), or a
video file (played at its own frame rate) in one of media_guard.VIDEO_FORMATS, checked with FFmpeg's
demuxer whitelist before OpenCV opens it (no playlists: an .m3u8 or ffconcat "video" is refused).
Frames over MAX_FRAME_PIXELS are dropped and reported. The grabber hands each frame to `on_frame` and keeps
nothing itself, so a slow consumer only ever sees the newest frame: stale frames are dropped, not
queued. A source that fails to open or stops delivering (unplugged, stream lost, end of file) is
reported through `on_error` and reopened with exponential backoff; a file therefore starts over.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from edge_mmm.audio.media_guard import MAX_FRAME_PIXELS, probe_video_file
from edge_mmm.errors import InputError, require
from edge_mmm.runtime.retry import Backoff, SourceThread, run_with_retry

STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "rtmp://")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class CameraSpec:
    """What `cv2.VideoCapture` gets: a target, the backend to use and whether it is a file to pace."""

    target: Union[int, str]
    kind: str  # "v4l2" | "gstreamer" | "stream" | "file"


def parse_camera_source(src: str) -> CameraSpec:
    """Classify a --camera argument; a path that is not a file is an InputError naming it."""
    s = (src or "").strip()
    if not s:
        raise InputError("--camera is empty; pass a V4L2 index, /dev/videoN, a GStreamer pipeline, a URL or a video file")
    if s.isdigit():
        return CameraSpec(int(s), "v4l2")
    if s.startswith("/dev/video"):
        return CameraSpec(s, "v4l2")
    if "!" in s:
        return CameraSpec(s, "gstreamer")
    if s.lower().startswith(STREAM_SCHEMES):
        return CameraSpec(s, "stream")
    if _SCHEME.match(s) and not Path(s).expanduser().is_file():
        raise InputError(f"--camera {src}: URL scheme not allowed (allowed: "
                         f"{', '.join(x[:-3] for x in STREAM_SCHEMES)})")
    path = Path(s).expanduser()
    if not path.is_file():
        raise InputError(f"--camera {src}: no such video file (or not a V4L2 index / pipeline / URL)")
    probe_video_file(path)  # an allowed single-file container with a frame size under the limit
    return CameraSpec(str(path), "file")


class CameraSource(SourceThread):
    """Grab frames in a thread; `on_frame(bgr, monotonic_t)` gets each one; faults go to `on_error`."""

    thread_name = "edge-mmm-camera"

    def __init__(self, src: str, on_frame: Callable[[np.ndarray, float], None],
                 on_error: Callable[[str, float], None], backoff: Optional[Backoff] = None):
        super().__init__()
        self.spec = parse_camera_source(src)
        self.src = src
        self.on_frame = on_frame
        self.on_error = on_error
        self.backoff = backoff or Backoff()
        self.frames = 0  # frames delivered
        self.opened = 0  # successful opens
        self._cv2 = require("cv2", "camera", "camera input")

    def open(self):
        """An opened `cv2.VideoCapture`; RuntimeError (reported, then retried by the grabber) when it cannot open."""
        cv2 = self._cv2
        api = {"v4l2": getattr(cv2, "CAP_V4L2", cv2.CAP_ANY), "gstreamer": cv2.CAP_GSTREAMER,
               "stream": cv2.CAP_FFMPEG, "file": cv2.CAP_FFMPEG}[self.spec.kind]
        cap = cv2.VideoCapture(self.spec.target, api)
        if not cap.isOpened():
            cap.release()
            raise RuntimeError(f"cannot open camera {self.src} ({self.spec.kind})")
        if self.spec.kind in ("v4l2", "gstreamer", "stream"):
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep the driver queue short: we want the newest frame
        return cap

    def _attempt(self) -> bool:
        cap = self.open()
        self.opened += 1
        start = self.frames
        fps = cap.get(self._cv2.CAP_PROP_FPS) if self.spec.kind == "file" else 0.0
        period = 1.0 / fps if fps and 0 < fps <= 240 else (1.0 / 30 if self.spec.kind == "file" else 0.0)
        t_next = time.monotonic()
        try:
            while not self.stopping.is_set():
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                if frame.shape[0] * frame.shape[1] > MAX_FRAME_PIXELS:
                    raise RuntimeError(f"camera {self.src} delivers {frame.shape[1]}x{frame.shape[0]} frames, over "
                                       f"the {MAX_FRAME_PIXELS} pixel limit")
                if period:  # a file plays at its frame rate, like a camera would deliver it
                    t_next += period
                    if self.stopping.wait(max(0.0, t_next - time.monotonic())):
                        break
                self.frames += 1
                self.on_frame(frame, time.monotonic())
        finally:
            cap.release()
        if not self.stopping.is_set() and self.frames == start:
            raise RuntimeError(f"camera {self.src} opened but delivered no frame")
        return self.frames > start

    def _on_error(self, message: str, retry_in: float) -> None:
        if message == "source ended":
            message = f"camera {self.src} stopped delivering frames"
        self.on_error(message, retry_in)

    def run(self) -> None:
        run_with_retry(self._attempt, self.stopping, self.backoff, self._on_error)
