"""Half-duplex echo gate: while the assistant speaks, microphone audio at or below the expected echo of
its own voice is replaced by silence before the VAD sees it; louder audio (the user talking over it)
passes and barges in.

No acoustic echo canceller is used: none of the maintained ones installs here. The gate needs only the
played level (`PlaybackBuffer.level`), so it works with any sink; its cost is that the user must speak
`barge_in_db` above the echo to interrupt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from edge_mmm.errors import InputError
from edge_mmm.speech_out.playback import PlaybackBuffer

FRAME = 512  # samples per decision (32 ms at 16 kHz, one VAD frame)


@dataclass
class EchoGateConfig:
    tail_s: float = 0.35  # the mic still hears the playback this long after its last sample (latency + room)
    window_s: float = 0.6  # the reference is the loudest block played within this window
    echo_gain: float = 1.0  # mic level per unit of played level (1.0: a loopback; a room is usually below)
    barge_in_db: float = 6.0  # audio this far above the expected echo is the user's voice

    def __post_init__(self):
        if self.tail_s < 0 or self.window_s <= 0 or self.echo_gain <= 0 or self.barge_in_db < 0:
            raise InputError(f"bad echo gate settings: {self}")


class EchoGate:
    """`gate(samples, t)` -> the samples with echo-level frames silenced; `t`: capture time of the last one."""

    def __init__(self, buffer: PlaybackBuffer, config: EchoGateConfig = EchoGateConfig(),
                 is_echo: Optional[Callable[[np.ndarray], bool]] = None):
        self.buffer = buffer
        self.config = config
        self.is_echo = is_echo  # a second test for a frame above the threshold: True silences it too
        self.gated_frames = 0  # frames replaced by silence
        self.echo_frames = 0  # of those, frames above the threshold that `is_echo` recognised
        self.passed_frames = 0  # frames that passed during playback (barge-in candidates)
        self.loudest_gated = 0.0  # RMS of the loudest frame silenced: what the echo reached

    def active(self, t: float) -> bool:
        last = self.buffer.last_audio_t
        return self.buffer.pending() > 0 or (last is not None and t <= last + self.config.tail_s)

    def __call__(self, samples: np.ndarray, t: float) -> np.ndarray:
        if not self.active(t):
            return samples
        c = self.config
        threshold = self.buffer.level(t, c.window_s) * c.echo_gain * 10 ** (c.barge_in_db / 20)
        out = np.array(samples, np.float32, copy=True)
        for i in range(0, out.size, FRAME):
            frame = out[i:i + FRAME]
            rms = float(np.sqrt(np.mean(frame ** 2)))
            if rms <= threshold:
                frame[:] = 0.0
                self.gated_frames += 1
                self.loudest_gated = max(self.loudest_gated, rms)
            elif self.is_echo is not None and self.is_echo(frame):
                frame[:] = 0.0
                self.gated_frames += 1
                self.echo_frames += 1
            else:
                self.passed_frames += 1
        return out
