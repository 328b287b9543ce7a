"""The turn manager: a question (spoken or typed) + the selected frame -> a streamed answer.

Prompt = optional system message + conversation history + this question. With a vision-language model
the image goes into the user message of the turn where the scene changed; while the scene stays the
same (see `runtime.frames`) no new image is added, so the whole conversation prefix, image tokens
included, is reused from the model's KV cache, and an identical frame never reaches the vision encoder
twice (content-hash embedding cache). At most one image stays in the history: a new scene drops the
older image (its words stay), which costs one re-prefill of the text history. A text-only LM ignores
frames (the assistant says so once). The history holds at most `max_history_turns` exchanges; when it
overflows it is cut to the newest half (so the KV cache of the prefix survives between cuts); a prompt
that still overflows the context drops its oldest exchanges until it fits.

`answer()` runs in the turn thread and checks `cancel` between tokens (barge-in): the answer stops at
once, and what was said so far stays in the history. A question that continues an earlier one (the speaker
went on after the early endpoint had ended the question: `TurnRequest.continues`) withdraws that question's
exchange from the history, answered or cut off, and is asked whole in its place.

Work while the user speaks (`Speculation`, all on the turn thread, so the model still serves one caller):
at speech start the frame is chosen (the frame policy over the frames so far) and encoded, and the prompt's
prefix (system + history + this user message up to the question: image tokens included) is prefilled into
the KV cache; if the scene changes before the end of speech the frame is encoded again (`check_scene`).
At a pause the speculative transcript's whole prompt is prefilled (`speculate_question`); speech resuming
discards it (`discard_question`). The turn then finds its image embedding in the cache and its prompt in
the KV cache, all but the tokens that differ. Speculation never changes the history or the scene state:
`answer()` commits them, using the speculated frame unless the frame chosen at the end of speech shows a
different scene.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from edge_mmm.errors import ContextOverflowError, InputError
from edge_mmm.runtime.events import EventBus
from edge_mmm.runtime.frames import FrameStore, SceneTracker, scene_difference, thumbnail
from edge_mmm.text.generation import GenerationConfig, common_prefix

# two questions whose tokens differ from the first: the common prefix of their prompts is the part of a
# prompt that does not depend on the question
_PROBES = ("a", "b")


@dataclass
class TurnConfig:
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_tokens=128))
    system_prompt: Optional[str] = None
    max_history_turns: int = 6
    scene_threshold: float = 8.0

    def __post_init__(self):
        self.generation.validate()
        if self.max_history_turns < 0:
            raise InputError(f"max_history_turns must be >= 0, got {self.max_history_turns}")


@dataclass
class TurnRequest:
    """A question to answer. Times are monotonic; speech times are None for a typed question."""

    question: str
    source: str = "text"  # "speech" | "text"
    utterance: int = -1
    speech_start_t: Optional[float] = None
    speech_end_t: Optional[float] = None
    asr: Dict[str, float] = field(default_factory=dict)  # ASR timings of the final transcript
    submitted_t: float = field(default_factory=time.monotonic)
    # the utterance this question continues (its text starts this one's): that utterance's exchange, if it is
    # the history's last, is withdrawn before this question is answered
    continues: Optional[int] = None


def join_question(first: str, rest: str) -> str:
    """The question an early-ended utterance and the speech that continued it make together. Whisper writes the
    continuation as a new transcript, often with a lower-case first word: after a finished sentence it is
    capitalized ("France? and what" -> "France? And what")."""
    first, rest = first.strip(), rest.strip()
    if first[-1:] in (".", "?", "!") and rest[:1].islower():
        rest = rest[0].upper() + rest[1:]
    return f"{first} {rest}".strip()


@dataclass
class Speculation:
    """Work done for the utterance being spoken, before its end. Times in seconds of compute."""

    utterance: int
    speech_start_t: float
    frame: Any = None  # the frame chosen during speech (BGR array) or None
    thumb: Any = None  # its scene thumbnail
    image: Any = None  # the image this turn's user message carries; None: none, or the history's stands
    scene_changed: bool = False
    scene_diff: float = float("inf")
    encodes: int = 0  # vision encoder runs (a scene change during speech adds one)
    vision_s: float = 0.0
    prefix_tokens: int = 0
    prefill_s: float = 0.0  # prefix + question prefills
    question: Optional[str] = None  # the speculative transcript whose prompt is prefilled
    question_tokens: int = 0
    discarded: int = 0  # speculative transcripts dropped because the speech resumed
    checked_t: float = 0.0
    opening: str = ""  # the text of the question this utterance continues (its prompt starts with it)
    withdraw: bool = False  # that question's exchange is the history's last: the turn withdraws it


def is_vlm(model) -> bool:
    """A VisionLanguageModel (takes images) rather than a text-only LanguageModel."""
    return hasattr(model, "image_features")


class TurnManager:
    """Builds prompts, runs generation, streams `answer.delta`/`answer.done` and a `timing` event per turn."""

    def __init__(self, model, bus: EventBus, frames: FrameStore, config: Optional[TurnConfig] = None):
        self.model = model
        self.vlm = is_vlm(model)
        self.bus = bus
        self.frames = frames
        self.config = config or TurnConfig()
        self.scene = SceneTracker(self.config.scene_threshold)
        self.history: List[Dict[str, Any]] = []  # alternating user / assistant messages
        self.exchange_utterance: Optional[int] = None  # the spoken utterance of the history's last exchange
        self.turns = 0
        self.speculation: Optional[Speculation] = None
        self._lock = threading.Lock()  # one generation at a time on the shared model

    def reset(self) -> None:
        """Forget the conversation (and the model's KV cache of it)."""
        with self._lock:
            self.history = []
            self.exchange_utterance = None
            self.speculation = None
            self.scene.reset()
            self.model.reset()

    # ------------------------------------------------------------------ prompt
    def _user_message(self, question: str, image) -> Dict[str, Any]:
        if not self.vlm:
            return {"role": "user", "content": question}
        parts = [{"type": "image", "image": image}] if image is not None else []
        return {"role": "user", "content": parts + [{"type": "text", "text": question}]}

    def _assistant_message(self, text: str) -> Dict[str, Any]:
        if not self.vlm:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    def _messages(self, history: List[Dict[str, Any]], user: Dict[str, Any]) -> List[Dict[str, Any]]:
        system = []
        if self.config.system_prompt:
            content = self.config.system_prompt
            system = [{"role": "system",
                       "content": [{"type": "text", "text": content}] if self.vlm else content}]
        return system + history + [user]

    def _drop_history_images(self) -> None:
        for m in self.history:
            if isinstance(m["content"], list):
                m["content"] = [p for p in m["content"] if p.get("type") != "image"]

    def _history_has_image(self, history: Optional[List[Dict[str, Any]]] = None) -> bool:
        return any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
                   for m in (self.history if history is None else history))

    def _withdraw(self, utterance: Optional[int]) -> bool:
        """Drop the history's last exchange if it is `utterance`'s (a question the speaker then went on with)."""
        if utterance is None or utterance != self.exchange_utterance or len(self.history) < 2:
            return False
        self.history = self.history[:-2]
        self.exchange_utterance = None
        return True

    def _pick_image(self, req: TurnRequest, timings: Dict[str, Any]):
        """(image for this user message or None, frame seq) per the frame and scene policies."""
        frame = self.frames.select(req.speech_start_t, req.speech_end_t)
        if frame is None:
            timings["frame"] = "none"
            return None, None
        timings["frame_age_s"] = round(time.monotonic() - frame.t, 4)
        image, changed, diff = self.scene.choose(frame.image)
        timings["scene_changed"] = changed
        timings["scene_diff"] = round(diff, 3) if diff != float("inf") else None
        if not changed and self._history_has_image():
            return None, frame.seq  # the image already in the history stands for this scene
        self._drop_history_images()
        return image, frame.seq

    # ------------------------------------------------------------------ speculation (while the user speaks)
    def speculate(self, utterance: int, speech_start_t: float, continues: Optional[Tuple[int, str]] = None
                  ) -> Speculation:
        """At speech start: choose and encode the frame and prefill the prompt up to the question.
        `continues`: (utterance, text) of the question this speech goes on with (its exchange is left out
        and its text opens this question)."""
        with self._lock:
            spec = self.speculation = Speculation(utterance, speech_start_t)
            if continues is not None:
                spec.opening = continues[1]
                spec.withdraw = continues[0] == self.exchange_utterance and len(self.history) >= 2
            self._speculate_scene(spec)
            self._prefill(spec, None)
            return spec

    def scene_check_due(self, utterance: int, every_s: float = 0.1) -> bool:
        """`check_scene` would look at the frames now (a VLM speculating on this utterance, `every_s` since the
        last look)."""
        spec = self.speculation
        return (self.vlm and spec is not None and spec.utterance == utterance
                and time.monotonic() - spec.checked_t >= every_s)

    def check_scene(self, utterance: int, every_s: float = 0.1) -> bool:
        """During speech: if the frame the policy would choose now shows another scene than the speculated
        one, encode it and prefill again. True when it did."""
        if not self.scene_check_due(utterance, every_s):
            return False
        spec = self.speculation
        now = time.monotonic()
        spec.checked_t = now
        frame = self.frames.select(spec.speech_start_t, now)
        if frame is None or scene_difference(thumbnail(frame.image), spec.thumb) < self.scene.threshold:
            return False
        with self._lock:
            self._speculate_scene(spec, frame)
            self._prefill(spec, spec.question)
        return True

    def speculate_question(self, utterance: int, question: str) -> bool:
        """At a pause: prefill the whole prompt for the speculative transcript `question`."""
        spec = self.speculation
        if spec is None or spec.utterance != utterance or not question.strip():
            return False
        with self._lock:
            self._prefill(spec, join_question(spec.opening, question))
        return True

    def discard_question(self, utterance: int) -> bool:
        """The speech resumed: the speculative transcript is void (its KV positions past the prefix are
        overwritten by the next prefill; nothing else to undo)."""
        spec = self.speculation
        if spec is None or spec.utterance != utterance or spec.question is None:
            return False
        spec.question = None
        spec.discarded += 1
        return True

    def _speculate_scene(self, spec: Speculation, frame=None) -> None:
        if not self.vlm:
            return
        if frame is None:
            frame = self.frames.select(spec.speech_start_t, time.monotonic())
        if frame is None:
            return
        image, changed, diff = self.scene.peek(frame.image)
        spec.frame, spec.thumb, spec.scene_changed, spec.scene_diff = frame.image, thumbnail(frame.image), changed, diff
        spec.image = None if not changed and self._history_has_image(self._base_history(spec)) else image
        if spec.image is not None:
            _, _, timings, _ = self.model.image_features([spec.image])
            if not timings.get("image_cache_hit"):
                spec.encodes += 1
            spec.vision_s += timings.get("vision_s", 0.0)

    def _base_history(self, spec: Speculation) -> List[Dict[str, Any]]:
        return self.history[:-2] if spec.withdraw else self.history

    def _spec_history(self, spec: Speculation) -> List[Dict[str, Any]]:
        history = self._base_history(spec)
        if spec.image is None:
            return history
        return [dict(m, content=[p for p in m["content"] if p.get("type") != "image"])
                if isinstance(m["content"], list) else m for m in history]

    def _prefill(self, spec: Speculation, question: Optional[str]) -> None:
        """Prefill the prompt of `question` (all but its last token), or with None the part of the prompt
        that any question shares."""
        history = self._spec_history(spec)
        t0 = time.perf_counter()
        try:
            if question is None:
                probes = [self._prompt_ids(history, join_question(spec.opening, q), spec.image) for q in _PROBES]
                n = common_prefix(probes[0][1], probes[1][1])
                prompt, ids = probes[0]
            else:
                prompt, ids = self._prompt_ids(history, question, spec.image)
                n = len(ids) - 1
            if n <= 0:
                return
            # an image the history holds whose embedding left the cache is encoded by prepare(): vision time
            vision = prompt.timings.get("vision_s", 0.0) if self.vlm else 0.0
            if self.vlm:
                self.model.prefill_prefix(prompt, n)
            else:
                self.model.prefill_prefix(ids[:n])
        except ContextOverflowError:
            return  # the turn itself trims the history
        spec.vision_s += vision
        spec.prefill_s += time.perf_counter() - t0 - vision
        if question is None:
            spec.prefix_tokens = n
        else:
            spec.question, spec.question_tokens = question, n + 1

    def _prompt_ids(self, history, question: str, image):
        """(what `prefill_prefix` takes, token ids) of the prompt for `question`."""
        messages = self._messages(history, self._user_message(question, image))
        if self.vlm:
            prepared = self.model.prepare(messages)
            return prepared, prepared.ids
        ids = self.model.encode_prompt(messages)
        return ids, ids

    def _spec_image(self, spec: Speculation, req: TurnRequest, timings: Dict[str, Any]):
        """(used, image for this user message) from the speculation, committing the scene; used is False
        when the frame chosen at the end of speech shows another scene than the speculated one (the
        caller then picks afresh)."""
        frame = self.frames.select(req.speech_start_t, req.speech_end_t)
        if frame is None and spec.frame is None:
            timings["frame"] = "none"
            return True, None
        if frame is None or spec.frame is None or \
                scene_difference(thumbnail(frame.image), spec.thumb) >= self.scene.threshold:
            return False, None
        timings["frame_age_s"] = round(time.monotonic() - frame.t, 4)
        timings["scene_changed"] = spec.scene_changed
        timings["scene_diff"] = round(spec.scene_diff, 3) if spec.scene_diff != float("inf") else None
        if spec.scene_changed:
            self.scene.commit(spec.frame)
        if spec.image is not None:
            self._drop_history_images()
        return True, spec.image

    # ------------------------------------------------------------------ generation
    def _start(self, user: Dict[str, Any], timings: Dict[str, Any]):
        """Prepare and start the stream, dropping the oldest exchanges while the prompt overflows."""
        while True:
            messages = self._messages(self.history, user)
            try:
                if self.vlm:
                    prepared = self.model.prepare(messages)
                    timings.update({k: round(v, 6) for k, v in prepared.timings.items()})
                    return self.model.stream(prepared, self.config.generation)
                return self.model.stream(messages, self.config.generation)
            except ContextOverflowError:
                if len(self.history) < 2:
                    raise
                self.history = self.history[2:]
                timings["history_trimmed"] = timings.get("history_trimmed", 0) + 1

    def answer(self, req: TurnRequest, cancel: threading.Event) -> Dict[str, Any]:
        """Answer one question; returns the turn's timing record (also published as a `timing` event)."""
        with self._lock:
            return self._answer(req, cancel)

    def _answer(self, req: TurnRequest, cancel: threading.Event) -> Dict[str, Any]:
        t0 = time.monotonic()
        self.turns += 1
        turn = self.turns
        timings: Dict[str, Any] = {"stage": "turn", "turn": turn, "source": req.source,
                                   "queue_s": round(t0 - req.submitted_t, 6)}
        timings.update(req.asr)
        if req.continues is not None:
            timings["continues"] = req.continues
            timings["withdrew"] = self._withdraw(req.continues)
        image = None
        spec = None
        if req.source == "speech":  # a typed question leaves the speculation of a spoken one alone
            spec, self.speculation = self.speculation, None
            if spec is not None and spec.utterance != req.utterance:
                spec = None
        if spec is not None:
            timings.update({"spec_vision_s": round(spec.vision_s, 6), "spec_encodes": spec.encodes,
                            "spec_prefill_s": round(spec.prefill_s, 6), "spec_prefix_tokens": spec.prefix_tokens,
                            "spec_question": spec.question == req.question, "spec_discarded": spec.discarded})
        used = False
        if self.vlm:
            if spec is not None:
                used, image = self._spec_image(spec, req, timings)
                timings["spec_frame_used"] = used
            if not used:
                image, _ = self._pick_image(req, timings)
        user = self._user_message(req.question, image)
        stream = self._start(user, timings)
        pieces: List[str] = []
        t_first = None
        cancelled = False
        for delta in stream:
            if t_first is None:
                t_first = time.monotonic()
            pieces.append(delta)
            self.bus.publish("answer.delta", text=delta, turn=turn)
            if cancel.is_set():
                cancelled = True
                break
        t_end = time.monotonic()
        text = "".join(pieces)
        result = stream.result
        if result is not None:
            rt = result.timings
            timings["prompt_tokens"] = result.prompt_tokens
            timings["prompt_reused"] = int(rt.get("prompt_reused", 0))
            timings["tokens"] = len(result.token_ids)
            timings["decode_tok_s"] = round(rt.get("decode_tok_s", 0.0), 3)
            timings["prefill_s"] = round(rt["prefill_s"], 6)
        timings["ttft_s"] = round(t_first - t0, 6) if t_first is not None else None
        timings["answer_s"] = round(t_end - t0, 6)
        if req.speech_end_t is not None and t_first is not None:
            timings["eos_to_first_token_s"] = round(t_first - req.speech_end_t, 6)
        finish = "cancelled" if cancelled else (result.finish_reason if result is not None else "stop")
        self.history += [user, self._assistant_message(text.strip())]
        self.exchange_utterance = req.utterance if req.source == "speech" else None
        n = self.config.max_history_turns
        if len(self.history) > 2 * n:
            # cut to half the window at once: every cut changes the prompt's start and so voids the KV
            # cache; a sliding window would void it on every turn once full
            self.history = self.history[len(self.history) - 2 * max(1, n // 2):] if n else []
        self.bus.publish("answer.done", text=text, turn=turn, question=req.question, finish_reason=finish,
                         cancelled=cancelled)
        self.bus.publish("timing", **timings)
        return timings
