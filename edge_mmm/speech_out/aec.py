"""Acoustic echo cancellation for spoken answers (opt-in: `edge-mmm run --speak --echo-cancel`, extra `aec`).

WebRTC's AEC3, through livekit's `AudioProcessingModule` (prebuilt wheels for x86-64 and aarch64), subtracts
the assistant's own voice from the microphone. The reference is what the sink plays: every block it pulls
from the `PlaybackBuffer` (audio or silence) is kept with its play time, resampled to 16 kHz (PyAV) and fed
to AEC3 before the microphone audio captured after it was heard, so AEC3 only has to find the acoustic and
input delay. Whatever AEC leaves still goes through the half-duplex `EchoGate`, told to expect the echo
`residual_db` lower than the gate alone would (measured: AEC3 takes 35-40 dB off a delayed loopback), so the
user can talk over an answer at normal level instead of louder than the playback.

That credit holds only while AEC3 knows the echo's delay: after an output stall (the echo now comes later than
the reference says) AEC3 takes about a second to find it again, and what leaks meanwhile is the answer itself.
So a frame loud enough to pass the gate is also cross-correlated with the recent reference; a frame that is
mostly a delayed copy of it (`leak_correlation`) is silenced too, and the answer does not barge in on itself.

AEC3 works on 10 ms frames; the cleaned audio comes out at most one frame (10 ms) later than it went in.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Deque, Tuple

import numpy as np

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.audio.io import StreamResampler
from edge_mmm.errors import InputError, require
from edge_mmm.speech_out.echo import EchoGate, EchoGateConfig
from edge_mmm.speech_out.playback import PlaybackBuffer

FRAME = SAMPLE_RATE // 100  # AEC3 processes 10 ms frames (at the microphone's 16 kHz)
MAX_PLAYED_BLOCKS = 512  # reference blocks kept until the capture side takes them (~10 s of 20 ms blocks)


@dataclass
class EchoCancelConfig:
    residual_db: float = 30.0  # the gate after AEC expects the echo this much lower than without AEC
    # the reference is handed to AEC3 this long before its reported play time: AEC3 can only cancel an echo
    # whose reference it already has, and a sink's reported play time is off by +-20 ms on a PulseAudio loopback
    render_lead_ms: int = 100
    # a frame loud enough to pass the gate that still correlates this much with the reference (normalised,
    # best lag) is the answer leaking through while AEC3 re-converges (a playback dropout moved the echo)
    leak_correlation: float = 0.6
    max_echo_delay_ms: int = 500  # lags searched for that correlation: up to this long after the play time

    def __post_init__(self):
        if (not 0 <= self.residual_db <= 60 or not 0 <= self.render_lead_ms <= 500
                or not 0 < self.leak_correlation <= 1 or not 0 < self.max_echo_delay_ms <= 2000):
            raise InputError(f"bad echo cancel settings: {self} (residual_db 0-60, render_lead_ms 0-500, "
                             f"leak_correlation in (0, 1], max_echo_delay_ms 1-2000)")


def _to_i16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


class EchoCanceller:
    """`canceller(samples, t)` -> the microphone samples with the played answer removed (then gated);
    `t`: capture time of the last sample (monotonic), as `runtime.microphone.AudioRing` calls its gate."""

    def __init__(self, buffer: PlaybackBuffer, gate: EchoGateConfig = EchoGateConfig(),
                 config: EchoCancelConfig = EchoCancelConfig()):
        rtc = require("livekit.rtc", "aec", "--echo-cancel (WebRTC AEC3)")
        self.config = config
        self._rtc = rtc
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True)
        self._resample = StreamResampler(buffer.sample_rate)
        self._played: Deque[Tuple[float, np.ndarray]] = deque(maxlen=MAX_PLAYED_BLOCKS)  # (play time, block)
        self._played_lock = threading.Lock()
        self._render = np.zeros(0, np.int16)  # resampled reference not yet a whole frame
        self._capture = np.zeros(0, np.int16)  # microphone samples not yet a whole frame
        self._out = np.zeros(0, np.float32)  # cleaned samples not yet returned
        # the reference just fed to AEC3, at 16 kHz: what an echo in the microphone now can be a copy of
        self._recent = np.zeros(SAMPLE_RATE * (config.render_lead_ms + config.max_echo_delay_ms) // 1000,
                                np.float32)
        self.gate = EchoGate(buffer, EchoGateConfig(gate.tail_s, gate.window_s,
                                                    gate.echo_gain * 10 ** (-config.residual_db / 20),
                                                    gate.barge_in_db), is_echo=self._leaked)
        self.frames = 0  # capture frames processed
        self.echo_in = 0.0  # sum of squares of the microphone while the answer played (or its tail)
        self.echo_out = 0.0  # the same after AEC (before the gate)
        buffer.add_listener(self._on_pulled)

    # the sink's thread (a PortAudio callback): O(1), no allocation beyond the copy
    def _on_pulled(self, block: np.ndarray, t_out: float) -> None:
        with self._played_lock:
            self._played.append((t_out, block.copy()))

    def suppression_db(self) -> float:
        """How much quieter the microphone was after AEC than before it, over the time the answer played."""
        if self.echo_in <= 0:
            return 0.0
        return float(10 * np.log10(self.echo_in / max(self.echo_out, 1e-12)))

    def _feed_reference(self, t: float) -> None:
        """Every block heard by time `t`, resampled, into AEC3's render side in 10 ms frames."""
        with self._played_lock:
            ready = []
            while self._played and self._played[0][0] <= t:
                ready.append(self._played.popleft()[1])
        if ready:
            fed = np.concatenate([self._resample(block) for block in ready])
            self._recent = np.concatenate([self._recent, fed])[-self._recent.size:]
            self._render = np.concatenate([self._render, _to_i16(fed)])
        n = self._render.size // FRAME * FRAME
        for i in range(0, n, FRAME):
            self._apm.process_reverse_stream(self._rtc.AudioFrame(self._render[i:i + FRAME].tobytes(), SAMPLE_RATE,
                                                                  1, FRAME))
        self._render = self._render[n:]

    def _leaked(self, frame: np.ndarray) -> bool:
        """True when `frame` (after AEC) is mostly a delayed copy of the reference: its normalised
        cross-correlation with the recent reference, at the best lag, is `leak_correlation` or more."""
        ref, n = self._recent, frame.size
        if n == 0 or ref.size < n:
            return False
        size = 1 << int(np.ceil(np.log2(ref.size + n)))
        corr = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(frame, size)), size)[:ref.size - n + 1]
        energy = np.concatenate([[0.0], np.cumsum(ref.astype(np.float64) ** 2)])
        window_energy = energy[n:] - energy[:-n]
        norm = np.sqrt(np.maximum(window_energy, 1e-12) * max(float(np.dot(frame, frame)), 1e-12))
        return bool(np.max(np.abs(corr) / norm) >= self.config.leak_correlation)

    def __call__(self, samples: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(samples, np.float32).reshape(-1)
        self._feed_reference(t + self.config.render_lead_ms / 1000)
        self._capture = np.concatenate([self._capture, _to_i16(x)])
        n = self._capture.size // FRAME * FRAME
        cleaned = []
        for i in range(0, n, FRAME):
            frame = self._rtc.AudioFrame(self._capture[i:i + FRAME].tobytes(), SAMPLE_RATE, 1, FRAME)
            self._apm.set_stream_delay_ms(0)  # AEC3 estimates the delay itself
            self._apm.process_stream(frame)
            cleaned.append(np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32767.0)
            self.frames += 1
        self._capture = self._capture[n:]
        if cleaned:
            self._out = np.concatenate([self._out] + cleaned)
        if self._out.size < x.size:  # the first call: AEC3 holds back up to one frame
            self._out = np.concatenate([np.zeros(x.size - self._out.size, np.float32), self._out])
        out, self._out = self._out[:x.size], self._out[x.size:]
        if self.gate.active(t):
            self.echo_in += float(np.sum(x ** 2))
            self.echo_out += float(np.sum(out ** 2))
        return self.gate(out, t)
