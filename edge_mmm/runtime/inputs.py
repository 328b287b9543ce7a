"""Which cameras and microphones this machine has: V4L2 nodes probed through OpenCV, PortAudio inputs
through sounddevice. Each listing also says why it may be empty (extra missing, no library, no device)."""

from __future__ import annotations

import glob
import re
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

from edge_mmm.errors import InputError

NO_INPUT_HINT = ("pass --camera SRC (V4L2 index such as 0, /dev/videoN, a GStreamer pipeline, an RTSP URL "
                 "or a video file) and --mic SRC (a device index or name, or an audio file played in real "
                 "time); `edge-mmm devices --list-inputs` lists what is present")


@dataclass
class InputDevice:
    kind: str  # "camera" | "microphone"
    id: str  # what to pass to --camera / --mic
    name: str
    default: bool = False
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def list_cameras(probe: bool = True) -> Tuple[List[InputDevice], Optional[str]]:
    """(cameras, problem): /dev/video* nodes; with OpenCV each is opened and one frame read."""
    nodes = sorted(glob.glob("/dev/video*"), key=lambda p: int(re.sub(r"\D", "", p) or 0))
    if not nodes:
        return [], "no /dev/video* device (no V4L2 camera; a CSI camera needs --camera with a GStreamer pipeline)"
    try:
        import cv2
    except ImportError:
        cams = [InputDevice("camera", n, n) for n in nodes]
        return cams, "OpenCV is not installed, cameras were not probed: pip install 'edge-mmm[camera]'"
    cams = []
    for node in nodes:
        detail = {}
        if probe:
            cap = cv2.VideoCapture(node, getattr(cv2, "CAP_V4L2", cv2.CAP_ANY))
            ok, frame = cap.read() if cap.isOpened() else (False, None)
            if ok and frame is not None:
                detail = {"width": int(frame.shape[1]), "height": int(frame.shape[0]),
                          "fps": round(float(cap.get(cv2.CAP_PROP_FPS)), 2)}
            else:
                detail = {"error": "opened no video stream (a metadata node, or the camera is busy)"}
            cap.release()
        cams.append(InputDevice("camera", node, node, detail=detail))
    if probe and not any("error" not in c.detail for c in cams):
        return cams, "no /dev/video* node delivered a frame"
    return cams, None


def list_microphones() -> Tuple[List[InputDevice], Optional[str]]:
    """(microphones, problem): PortAudio devices with input channels; the default input is marked."""
    try:
        import sounddevice as sd
    except ImportError:
        return [], "sounddevice is not installed: pip install 'edge-mmm[audio]'"
    except OSError as exc:  # the Python package is there, the PortAudio library is not
        return [], f"PortAudio library not found ({exc}); on Debian/Ubuntu: apt-get install libportaudio2"
    try:
        devices = sd.query_devices()
        default_in = sd.default.device[0]
    except Exception as exc:  # noqa: BLE001 - PortAudio reports host problems as plain errors
        return [], f"PortAudio could not list devices: {exc}"
    mics = []
    for i, d in enumerate(devices):
        if d.get("max_input_channels", 0) > 0:
            mics.append(InputDevice("microphone", str(i), d["name"], default=i == default_in,
                                    detail={"channels": int(d["max_input_channels"]),
                                            "default_samplerate": float(d["default_samplerate"]),
                                            "hostapi": sd.query_hostapis(d["hostapi"])["name"]}))
    if not mics:
        return [], "PortAudio sees no input device (no sound card; in a container start PulseAudio)"
    if not any(m.default for m in mics):
        mics[0].default = True
    return mics, None


def check_microphone(device) -> None:
    """InputError when PortAudio lists input devices and `device` (an index, or a name that sounddevice
    matches by substrings) is not one of them: a typo fails at start instead of being retried forever. When
    PortAudio lists no input at all (no sound server yet), nothing is said: the microphone thread retries."""
    mics, _ = list_microphones()
    if not mics:
        return
    import sounddevice as sd

    try:
        sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as exc:
        have = "; ".join(f"{m.id}: {m.name}" for m in mics)
        raise InputError(f"--mic {device}: {exc} (input devices: {have})") from None


def default_camera() -> Optional[str]:
    """The first camera that delivered a frame, or None."""
    cams, _ = list_cameras(probe=True)
    good = [c for c in cams if "width" in c.detail]
    return good[0].id if good else None


def default_microphone() -> Tuple[Optional[str], Optional[str]]:
    """("default" when PortAudio has an input device, else None; the reason when there is none)."""
    mics, problem = list_microphones()
    return ("default" if mics else None), problem
