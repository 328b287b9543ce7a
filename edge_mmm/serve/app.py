"""OpenAI-compatible API over the loaded models: `create_app(settings)` returns the FastAPI app.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (text; `image_url` data-URL parts when a VLM is
loaded; `stream: true` as SSE chunks ending with `data: [DONE]`), `POST /v1/audio/transcriptions`
(multipart `file`). The models are used by one request at a time (`Admission`); their calls run in
worker threads so the event loop keeps answering (and refusing) other requests meanwhile.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` class in the routes

import asyncio
import base64
import binascii
import io
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.audio.io import decode_audio
from edge_mmm.asr.transcribe import TranscribeOptions
from edge_mmm.errors import EdgeMMMError, InputError, require
from edge_mmm.serve.guard import (Admission, ApiError, GuardMiddleware, error_body, install_error_handlers,
                                   json_body)
from edge_mmm.serve.settings import ServeSettings
from edge_mmm.text.chat_template import text_messages
from edge_mmm.text.generation import GenerationConfig

ROLES = ("system", "user", "assistant")
_DONE = object()
DISCONNECT_POLL_S = 0.1  # how often a running request checks that its client is still there


@dataclass
class Models:
    """What the server answers with; `vlm` and `asr` are optional."""

    lm: Any
    lm_id: str
    vlm: Any = None
    vlm_id: str = ""
    asr: Any = None
    asr_id: str = ""


def load_models(settings: ServeSettings) -> Models:
    """Load the models named in `settings` (typed errors name a missing/corrupt file before serving)."""
    from edge_mmm.text.api import load_lm

    lm = load_lm(settings.model, backend=settings.lm_backend, context_length=settings.context_length,
                 threads=settings.threads)
    models = Models(lm, Path(lm.name).name or "lm")
    if settings.vlm_model:
        from edge_mmm.vision.api import load_vlm

        models.vlm = load_vlm(settings.vlm_model, backend=settings.vlm_backend, quantize=settings.vlm_quantize,
                              threads=settings.threads, tile_batch=settings.vision_batch,
                              lm_backend=settings.vlm_lm_backend)
        models.vlm_id = Path(str(settings.vlm_model)).name
    if settings.asr:
        from edge_mmm.asr.api import load_asr

        models.asr = load_asr(settings.asr_model, backend=settings.asr_backend, threads=settings.threads)
        models.asr_id = "whisper-" + (Path(settings.asr_model).name if settings.asr_model else "tiny.en")
    return models


# --------------------------------------------------------------------------------------------------
# request parsing: every malformed field is an ApiError(400) naming it
# --------------------------------------------------------------------------------------------------
def _field(body: dict, name: str, kind, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be of type {kind.__name__}", param=name)
    return value


def refuse_unsupported(body: dict) -> None:
    """OpenAI request fields that would change the answer and that this server does not implement: a 400
    naming the field, not an answer that silently ignores it. Their neutral values pass (clients send them)."""
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none", "auto"):
        name = next(k for k in ("tools", "functions", "tool_choice") if body.get(k))
        raise ApiError(400, "tool and function calling is not supported by this server", param=name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "response_format: only {'type': 'text'} is supported (no JSON mode or schemas)",
                       param="response_format")
    if body.get("logprobs") or body.get("top_logprobs"):
        name = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise ApiError(400, "logprobs are not returned by this server", param=name)
    for name in ("frequency_penalty", "presence_penalty"):
        value = _field(body, name, float, 0.0)
        if value != 0.0:
            raise ApiError(400, f"'{name}' is not supported (only 0)", param=name)
    if body.get("logit_bias"):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")


def generation_config(body: dict, cap: int) -> GenerationConfig:
    """Sampling fields of a chat request -> GenerationConfig; max_tokens is clamped to the server's cap."""
    max_tokens = _field(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, cap)
    if max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be >= 1", param="max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    n = _field(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    refuse_unsupported(body)
    cfg = GenerationConfig(max_tokens=min(max_tokens, cap), temperature=_field(body, "temperature", float, 1.0),
                           top_p=_field(body, "top_p", float, 1.0), seed=_field(body, "seed", int),
                           stop_strings=tuple(stop or ()))
    if not 0 <= cfg.temperature <= 2:  # also refuses NaN
        raise ApiError(400, "'temperature' must be in [0, 2]", param="temperature")
    try:
        cfg.validate()
    except InputError as exc:
        raise ApiError(400, str(exc)) from exc
    return cfg


def _image_bytes(url: Any, settings: ServeSettings) -> Tuple[bytes, int]:
    """A base64 data URL -> (image bytes, pixels), after checking the pixel count from the image header."""
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, "image_url must be a data URL (data:image/...;base64,...); "
                            "remote URLs and server paths are not read", param="image_url")
    header, _, payload = url.partition(",")
    if ";base64" not in header or not payload:
        raise ApiError(400, "image data URL must be base64 encoded", param="image_url")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image data URL is not valid base64", param="image_url") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except (Image.UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(400, "image data URL does not hold a readable image", param="image_url") from None
    if w * h > settings.max_image_pixels:
        raise ApiError(400, f"image is {w}x{h} = {w * h} pixels, over the {settings.max_image_pixels} limit",
                       param="image_url", code="image_too_large")
    return data, w * h


def parse_messages(body: dict, settings: ServeSettings) -> Tuple[List[Dict[str, Any]], bool]:
    """OpenAI messages -> (messages for our models, has_images). Images become `image` parts (bytes)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out, n_images, pixels, chars = [], 0, 0, 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with role in {ROLES}", param="messages")
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
            _check_chars(chars, settings)
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                chars += len(part["text"])
                _check_chars(chars, settings)
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                n_images += 1
                if n_images > settings.max_images:
                    raise ApiError(400, f"at most {settings.max_images} images per request", param="messages")
                data, n_pixels = _image_bytes(url, settings)
                pixels += n_pixels
                if pixels > settings.max_request_pixels:  # decoding them all would cost this much memory
                    raise ApiError(400, f"the request's images hold {pixels} pixels together, over the "
                                        f"{settings.max_request_pixels} limit per request", param="messages",
                                   code="image_too_large")
                parts.append({"type": "image", "image": data})
            else:
                raise ApiError(400, f"messages[{i}]: unsupported content part (text or image_url)", param="messages")
        out.append({"role": m["role"], "content": parts})
    return out, n_images > 0


def _check_chars(chars: int, settings: ServeSettings) -> None:
    # before any tokenizing: a huge prompt costs time and memory even when the context check refuses it
    if chars > settings.max_prompt_chars:
        raise ApiError(400, f"the messages hold more than {settings.max_prompt_chars} characters (the limit per "
                            f"request)", param="messages", code="prompt_too_long")


def refuse_control_text(messages: List[Dict[str, Any]], vlm) -> None:
    """The VLM's prompt is encoded with control tokens parsed (its processor expands `<image>` in the text), so
    message text that holds one is refused (the text LM instead encodes such text as plain text)."""
    from edge_mmm.vision.processor import IMAGE_TOKEN

    reserved = sorted(set(vlm.processor.tokenizer.special_strings()) | {IMAGE_TOKEN})
    for i, m in enumerate(messages):
        parts = [m["content"]] if isinstance(m["content"], str) else [p["text"] for p in m["content"]
                                                                      if p["type"] == "text"]
        for text in parts:
            hit = next((t for t in reserved if t in text), None)
            if hit is not None:
                raise ApiError(400, f"messages[{i}] holds the control token {hit!r}, which a request to the vision "
                                    f"model may not contain", param="messages", code="control_token")


# --------------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------------
def create_app(settings: ServeSettings, models: Optional[Models] = None):
    """The FastAPI app; loads the models named in `settings` unless `models` is given."""
    fastapi = require("fastapi", "serve", "edge-mmm serve")
    require("multipart", "serve", "audio uploads (python-multipart)")
    from fastapi.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    models = models or load_models(settings)
    app = fastapi.FastAPI(title="edge-mmm", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(settings.queue_size)
    model_lock = threading.Lock()  # a worker thread left behind by a dropped stream still holds the model
    app.state.settings, app.state.models, app.state.admission = settings, models, admission

    install_error_handlers(app)

    def locked(fn, *args):
        with model_lock:
            return fn(*args)

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": admission.in_flight}

    @app.get("/v1/models")
    async def list_models():
        ids = [models.lm_id] + [i for i in (models.vlm_id, models.asr_id) if i]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "edge-mmm"}
                                           for i in ids]}

    kv_owner: Dict[int, Any] = {}  # id(model) -> the connection whose conversation its KV cache holds

    def claim(model, owner) -> None:
        """Reuse a model's KV cache only within one client connection's conversation: a cache filled by
        another client is dropped first, so no prefix of someone else's prompt can be timed (hold model_lock)."""
        if kv_owner.get(id(model)) != owner:
            model.reset()
            kv_owner[id(model)] = owner

    def connection(request) -> Tuple[Any, ...]:
        client = request.scope.get("client") or ("", 0)
        return tuple(client), request.headers.get("authorization", "")

    async def until_disconnect(request, work):
        """Run `work(stop)` in a worker thread and return its result; when the client hangs up first, set
        `stop` (the worker ends after its current token or segment), wait for it and return None."""
        stop = threading.Event()
        task = asyncio.ensure_future(run_in_threadpool(work, stop))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    stop.set()
                    await asyncio.wait({task})
                    if not task.cancelled():
                        task.exception()  # retrieved: nobody is left to report it to
                    return None
        finally:
            stop.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await json_body(request)
        messages, has_images = parse_messages(body, settings)
        config = generation_config(body, settings.max_tokens)
        stream = _field(body, "stream", bool, False)
        if has_images and models.vlm is None:
            raise ApiError(400, "this server has no vision model loaded (start it with --vlm-model)",
                           param="messages")
        ids = None
        if has_images:
            refuse_control_text(messages, models.vlm)
            model, model_id, prompt = models.vlm, models.vlm_id, messages
        else:
            model, model_id, prompt = models.lm, models.lm_id, text_messages(messages)
            ids = await run_in_threadpool(model.encode_prompt, prompt)  # tokenized outside the model lock
        owner = connection(request)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def start():
            with model_lock:
                claim(model, owner)
                return model.stream_ids(ids, config) if ids is not None else model.stream(prompt, config)

        if not stream:
            def work(stop):
                with model_lock:
                    for _ in tokens:
                        if stop.is_set():
                            return None
                return tokens.result

            async with admission:
                tokens = await run_in_threadpool(start)
                gen = await until_disconnect(request, work)
            if gen is None:  # the client hung up; generation was stopped
                return Response(status_code=499)
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                                 "finish_reason": gen.finish_reason}],
                    "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.token_ids),
                              "total_tokens": gen.prompt_tokens + len(gen.token_ids)}}

        await admission.__aenter__()  # before the 200 goes out, so a full queue is still a 429
        try:
            tokens = await run_in_threadpool(start)
        except BaseException:
            await admission.__aexit__(None, None, None)
            raise

        def chunk(delta: dict, finish=None) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": model_id, "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish}]}) + "\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        delta = await run_in_threadpool(locked, next, tokens, _DONE)
                    except Exception as exc:  # the 200 is sent: report in-band, as OpenAI does, then end
                        status, message = ((400, str(exc)) if isinstance(exc, EdgeMMMError)
                                           else (500, f"internal error ({exc.__class__.__name__})"))
                        yield "data: " + json.dumps(error_body(status, message)) + "\n\n"
                        break
                    if delta is _DONE:
                        finish = tokens.result.finish_reason if tokens.result is not None else "stop"
                        yield chunk({}, finish)
                        break
                    if delta:
                        yield chunk({"content": delta})
                yield "data: [DONE]\n\n"
            finally:
                await admission.__aexit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: fastapi.Request):
        if models.asr is None:
            raise ApiError(400, "this server has no speech model loaded")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except ApiError:
            raise
        except Exception:  # python-multipart's parse errors, a non-multipart body
            raise ApiError(400, "expected a multipart/form-data body with a 'file' field") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing 'file' (the audio to transcribe)", param="file")
        response_format = form.get("response_format") or "json"
        if response_format not in ("json", "text", "verbose_json", "srt", "vtt"):
            raise ApiError(400, "response_format must be json, text, verbose_json, srt or vtt", param="response_format")
        language = form.get("language") or None  # ISO-639-1, as OpenAI's API takes it; omitted: detected
        if language is not None and not isinstance(language, str):
            raise ApiError(400, "language must be a language code such as 'en'", param="language")
        prompt = form.get("prompt") or None  # OpenAI's field: text to condition the first window on
        if prompt is not None and not isinstance(prompt, str):
            raise ApiError(400, "prompt must be text", param="prompt")
        options = TranscribeOptions(language=language, initial_prompt=prompt)
        try:
            models.asr.tokenizer.sot_sequence(options.language, options.task)
        except InputError as exc:
            raise ApiError(400, str(exc), param="language") from None
        data = await upload.read()
        if not data:
            raise ApiError(400, "the uploaded file is empty", param="file")

        def work(stop):
            # decoded from the uploaded bytes only (no file name reaches FFmpeg), capped while decoding
            wav = decode_audio(data, "the uploaded file", SAMPLE_RATE, settings.max_audio_seconds)
            with model_lock:
                language, segments = models.asr.stream(wav, options)
                done = []
                for seg in segments:
                    if stop.is_set():
                        return None
                    done.append(seg)
            return language, done, len(wav) / SAMPLE_RATE

        async with admission:
            result = await until_disconnect(request, work)
        if result is None:
            return Response(status_code=499)
        language, segments, audio_s = result
        text = "".join(seg.text for seg in segments).strip()
        if response_format == "text":
            return PlainTextResponse(text)
        if response_format in ("srt", "vtt"):
            from edge_mmm.asr.subtitles import subtitles

            return PlainTextResponse(subtitles(segments, response_format))
        if response_format == "verbose_json":
            return {"task": "transcribe", "language": language, "duration": round(audio_s, 3), "text": text,
                    "segments": [{"start": seg.start, "end": seg.end, "text": seg.text} for seg in segments]}
        return {"text": text}

    # answers before routing: the key check and the body limit apply to every path
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       content_types={"/v1/audio/transcriptions": ("multipart/form-data",)})
    return app


def serve(settings: ServeSettings, models: Optional[Models] = None) -> None:
    """Load, then run uvicorn on settings.host:settings.port until interrupted."""
    uvicorn = require("uvicorn", "serve", "edge-mmm serve")
    app = create_app(settings, models)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=2)
