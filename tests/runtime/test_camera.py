"""Camera sources through OpenCV: classification of --camera, a video file played as a camera, a source
that ends (error + retry with backoff, then it starts over) and one that never opens (backoff grows)."""

import threading
import time

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from edge_mmm.errors import InputError  # noqa: E402
from edge_mmm.runtime.retry import Backoff  # noqa: E402
from edge_mmm.runtime.camera import CameraSource, parse_camera_source  # noqa: E402


def test_parse_camera_source(tmp_path, video_file):
    assert parse_camera_source("0").kind == "v4l2" and parse_camera_source("0").target == 0
    assert parse_camera_source("/dev/video2").kind == "v4l2"
    assert parse_camera_source("nvarguscamerasrc ! nvvidconv ! appsink").kind == "gstreamer"
    assert parse_camera_source("rtsp://10.0.0.2/stream").kind == "stream"
    assert parse_camera_source(str(video_file)).kind == "file"
    with pytest.raises(InputError, match="no such video file"):
        parse_camera_source(str(tmp_path / "missing.mp4"))


def test_camera_refuses_other_schemes_and_playlists(tmp_path, video_file):
    """Issue 18: a camera file is one allowed container read on its own; no file:/concat: URLs, no playlists."""
    for src in ("file:///etc/passwd", "concat:/a.mp4|/b.mp4", "subfile,,start,0,end,0,,:/etc/passwd",
                "data:video/mp4;base64,AAAA"):
        with pytest.raises(InputError):
            parse_camera_source(src)
    playlist = tmp_path / "cam.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:5.0,\n{video_file}\n#EXT-X-ENDLIST\n")
    concat = tmp_path / "cam.mp4"
    concat.write_text(f"ffconcat version 1.0\nfile {video_file}\n")
    junk = tmp_path / "v.avi"
    junk.write_bytes(b"x")
    for path in (playlist, concat, junk):
        with pytest.raises(InputError, match="not a supported media file"):
            parse_camera_source(str(path))


def _collect(src, backoff):
    frames, errors = [], []
    lock = threading.Lock()

    def on_frame(img, t):
        with lock:
            frames.append((img, t))

    cam = CameraSource(src, on_frame, lambda msg, retry: errors.append((msg, retry, time.monotonic())), backoff)
    return cam, frames, errors


def test_video_file_plays_at_its_rate_then_ends_and_is_retried(video_file):
    cam, frames, errors = _collect(str(video_file), Backoff(initial_s=0.2, max_s=1.0))
    cam.start()
    try:
        deadline = time.monotonic() + 20
        while len(errors) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert cam.stop(timeout=2.0)
    assert len(errors) >= 2, "the end of the file was not reported"
    assert all("stopped delivering frames" in m and r == 0.2 for m, r, _ in errors)  # data came: delay reset
    assert cam.opened >= 2  # reopened after the backoff
    img, _ = frames[0]
    assert img.shape == (120, 160, 3) and img.dtype == np.uint8
    ts = [t for _, t in frames[:30]]
    assert 2.0 < ts[-1] - ts[0] < 6.0  # 30 frames at 10 fps are paced (~2.9 s), not read in a burst


def test_missing_device_is_retried_with_growing_backoff():
    cam, frames, errors = _collect("57", Backoff(initial_s=0.05, factor=2.0, max_s=0.2))
    cam.start()
    try:
        deadline = time.monotonic() + 10
        while len(errors) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        assert cam.stop(timeout=2.0)
    assert not frames
    assert [r for _, r, _ in errors[:4]] == [0.05, 0.1, 0.2, 0.2]
    assert "cannot open camera 57" in errors[0][0]
