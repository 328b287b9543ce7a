"""Open untrusted media with FFmpeg (PyAV) so that it can read only the bytes it was given.

FFmpeg's demuxers can open other files and URLs on their own: an HLS playlist lists segments, `concat`
lists files, `image2` expands patterns, `dash` fetches manifests. A file or upload that picks such a
demuxer makes the decoder read whatever it names (a server's own media files). So every container is
opened from a Python file object (no file name reaches FFmpeg), with:
- `format_whitelist`: the single-file demuxers below, checked after probing and before any header is read;
- `protocol_whitelist=none`: a nested open (of any protocol, `file` included) fails.
Decoded length is capped by the callers while decoding (`max_seconds`), so a tiny file that decodes to
hours of audio is refused before the memory is spent.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import BinaryIO, Iterator

from edge_mmm.errors import InputError

# single-file audio containers (FFmpeg demuxer names; a name matches any alias of a demuxer)
AUDIO_FORMATS = ("wav", "w64", "flac", "mp3", "ogg", "matroska", "mov", "aac", "aiff", "caf", "au", "mpeg")
# single-file video containers for the camera's file input
VIDEO_FORMATS = ("matroska", "mov", "avi", "mpegts", "mpeg", "ogg", "flv", "mjpeg")
# the decoded-length caps' defaults: the library and CLI, the HTTP server (the server's is a setting)
MAX_AUDIO_SECONDS = 3 * 3600.0
SERVER_MAX_AUDIO_SECONDS = 30 * 60.0
# a frame's width x height beyond this is refused (the camera's file input, the demo's browser frames)
MAX_FRAME_PIXELS = 4096 * 4096


class MediaLimitError(InputError):
    """Media that exceeds a safety limit (decoded duration, pixels); the message names the limit."""


@contextmanager
def open_media(fileobj: BinaryIO, name: str, formats=AUDIO_FORMATS) -> Iterator["object"]:
    """An `av` input container over `fileobj`, restricted to `formats` and to no nested opens.

    InputError naming `name` when FFmpeg cannot read it or it is not one of the allowed containers."""
    import av

    options = {"format_whitelist": ",".join(formats), "protocol_whitelist": "none"}
    try:
        container = av.open(fileobj, mode="r", container_options=options, metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {name}: not a supported media file (allowed containers: "
                         f"{', '.join(formats)}): {exc.__class__.__name__}") from exc
    try:
        yield container
    finally:
        container.close()


def check_frame_size(width: int, height: int, name: str, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    """MediaLimitError when width x height is over `max_pixels` (checked from headers, before decoding)."""
    if width * height > max_pixels:
        raise MediaLimitError(f"{name}: {width}x{height} = {width * height} pixels per frame, over the "
                              f"{max_pixels} limit")


def probe_video_file(path, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    """A local video file for the camera input: an allowed container with a video stream of allowed size."""
    with open(path, "rb") as f, open_media(f, str(path), VIDEO_FORMATS) as container:
        if not container.streams.video:
            raise InputError(f"{path}: no video stream")
        ctx = container.streams.video[0].codec_context
        check_frame_size(int(ctx.width or 0), int(ctx.height or 0), str(path), max_pixels)
