"""The live demo: one page (plain HTML/JS from `static/`) over a running `LiveAssistant`.

`create_demo_app(assistant, settings)` returns the FastAPI app:
- `GET /` the page (+ `/demo.js`, `/demo.css`); `GET /healthz` (which sources are the server's);
- `GET /frame.jpg` the latest camera frame (204 before the first);
- `GET /events` the assistant's events as SSE, one `data: {"type", "data", "t"}` per event;
- `POST /ask` `{"text"}` a typed question;
- `POST /frame` (a JPEG/PNG) and `POST /audio` (float32 little-endian PCM, 16 kHz mono): the browser's own
  camera and microphone, where the assistant has none of its own (else 409);
- `POST /speaker` `{"on": bool}`: speak the answers to the pages (espeak-ng, sentence by sentence; the
  audio goes out as `speech.audio` events paced in real time, `speech.stop` on barge-in; 409 without a
  speaker). One switch for the server: every open page with its speaker on plays the audio.
The API key, the body limit and the error shape are those of `edge-mmm serve` (`serve.guard`,
`serve.settings`); only the static page is served without the key (it holds no data).
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` class in the routes

import asyncio
import io
import queue
from pathlib import Path
from typing import Any, Optional

from edge_mmm.audio.constants import SAMPLE_RATE
from edge_mmm.errors import EdgeMMMError, require
from edge_mmm.serve.guard import ApiError, GuardMiddleware, install_error_handlers, json_body
from edge_mmm.serve.settings import ServeSettings

STATIC_DIR = Path(__file__).parent / "static"
PAGES = {"/": ("demo.html", "text/html; charset=utf-8"),
         "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
         "/demo.css": ("demo.css", "text/css; charset=utf-8")}
# nothing outside this server may load: the page works offline on a device and leaks nothing
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; media-src 'self' blob: "
                                           "mediastream:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
# what each POST path accepts without an API key (the page sends these; see serve.guard)
CONTENT_TYPES = {"/ask": ("application/json",), "/audio": ("application/octet-stream",),
                 "/frame": ("image/jpeg", "image/png"), "/speaker": ("application/json",)}
MAX_QUESTION_CHARS = 1000
MAX_AUDIO_POST_S = 5.0  # one POST /audio carries at most this much audio
MAX_SUBSCRIBERS = 16  # open /events streams; more get 429
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies and the browser from closing an idle stream
POLL_S = 0.01  # how often an /events stream looks at its queue: a 2-core CPU decodes a token in ~4 ms, so a 50 ms
# poll delivered a short answer in one piece (and its first token up to 50 ms late)


def _static_files() -> dict:
    """Path -> (bytes, media type) for the page's files, read once."""
    files = {}
    for path, (name, media_type) in PAGES.items():
        source = STATIC_DIR / name
        if not source.is_file():
            raise EdgeMMMError(f"demo page file missing from the installed package: {source} "
                               f"(reinstall edge-mmm; package data edge_mmm/serve/static/*)")
        files[path] = (source.read_bytes(), media_type)
    return files


def decode_question(body: dict) -> str:
    """`{"text": "..."}` -> the question, stripped; ApiError(400) names the field otherwise."""
    text = body.get("text")
    if not isinstance(text, str):
        raise ApiError(400, "'text' must be a string (the question)", param="text")
    text = text.strip()
    if not text:
        raise ApiError(400, "'text' is empty", param="text")
    if len(text) > MAX_QUESTION_CHARS:
        raise ApiError(400, f"'text' is {len(text)} characters, over the {MAX_QUESTION_CHARS} limit", param="text")
    return text


def decode_audio(raw: bytes):
    """Raw float32 little-endian mono 16 kHz PCM -> float32 array in [-1, 1]; ApiError(400) when malformed."""
    import numpy as np

    if not raw or len(raw) % 4:
        raise ApiError(400, "audio body must be a non-empty sequence of float32 samples (little-endian, 16 kHz mono)")
    if len(raw) // 4 > MAX_AUDIO_POST_S * SAMPLE_RATE:
        raise ApiError(400, f"one audio post holds at most {MAX_AUDIO_POST_S:g} s ({int(MAX_AUDIO_POST_S * SAMPLE_RATE)}"
                            f" samples); got {len(raw) // 4}")
    samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(samples).all():
        raise ApiError(400, "audio samples must be finite")
    return np.clip(samples, -1.0, 1.0)


def decode_frame(raw: bytes, max_pixels: int, keep_pixels: Optional[int] = None):
    """JPEG/PNG bytes -> BGR uint8 array (the camera's layout), after checking the size from the header.

    A frame over `keep_pixels` is scaled down to fit (JPEG decodes at a reduced size directly): the
    assistant keeps a history of frames, so each must stay small."""
    import numpy as np
    from PIL import Image

    if not raw:
        raise ApiError(400, "frame body is empty (send one JPEG or PNG image)")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ApiError(400, f"frame is {w}x{h} = {w * h} pixels, over the {max_pixels} limit",
                               code="image_too_large")
            if img.format not in ("JPEG", "PNG"):
                raise ApiError(400, f"frame body is {img.format}, not JPEG or PNG")
            if keep_pixels is not None and w * h > keep_pixels:
                scale = (keep_pixels / (w * h)) ** 0.5
                size = (max(1, int(w * scale)), max(1, int(h * scale)))
                img.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale
                img = img.convert("RGB")
                img.thumbnail(size)
            rgb = np.asarray(img.convert("RGB"))
    except ApiError:
        raise
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise ApiError(400, "frame body is not a readable JPEG or PNG image") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


class BrowserSink:
    """A real-time paced sink whose audible blocks become `speech.audio` events for the pages (int16 base64).

    "First audio out" is when a block leaves for the pages; a page plays it after the SSE hop plus its own
    scheduling lead (demo.js SPEECH_LEAD_S)."""

    def __init__(self, block_s: float = 0.04):
        from edge_mmm.speech_out.playback import PacedSink

        self._paced = PacedSink(self._deliver, block_s)
        self.bus = None  # the assistant's EventBus, set by `demo_assistant`
        self.rate = 0

    @property
    def thread(self):
        return self._paced.thread

    def start(self, buffer) -> None:
        self.rate = buffer.sample_rate
        self._paced.start(buffer)

    def close(self, timeout: float = 1.0) -> bool:
        return self._paced.close(timeout)

    def _deliver(self, block, t: float) -> None:
        import base64

        import numpy as np

        pcm = (np.clip(block, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        if self.bus is not None:
            self.bus.publish("speech.audio", rate=self.rate, pcm=base64.b64encode(pcm).decode("ascii"))


# the browser's echo reaches the server late: played after the SSE hop and the page's lead, heard, then sent
# up in POST /audio chunks (BROWSER_AUDIO_MS in demo.js); the page's own echo canceller does the rest
BROWSER_ECHO_TAIL_S = 0.8


def browser_speaker():
    """(Speaker, BrowserSink) for the demo, or None when espeak-ng is not installed (the page says so)."""
    from edge_mmm.errors import DeviceError
    from edge_mmm.speech_out.echo import EchoGateConfig
    from edge_mmm.speech_out.speaker import Speaker, SpeakerConfig
    from edge_mmm.speech_out.tts import EspeakTts

    try:
        tts = EspeakTts()
    except DeviceError:  # no espeak-ng
        return None
    sink = BrowserSink()
    echo = EchoGateConfig(tail_s=BROWSER_ECHO_TAIL_S, window_s=BROWSER_ECHO_TAIL_S + 0.2)
    return Speaker(tts, sink, SpeakerConfig(echo=echo)), sink


def bind_browser_speaker(assistant, sink: BrowserSink) -> None:
    """Send the speaker's audio and stops to the pages, through the assistant's bus; off until a page asks."""
    sink.bus = assistant.bus
    assistant.voice.speaker.on_stop = lambda: assistant.bus.publish("speech.stop")
    assistant.voice.set_enabled(False)


def demo_assistant(config, models=None):
    """The demo's LiveAssistant, with a browser speaker when espeak-ng is installed."""
    from edge_mmm.runtime.assistant import LiveAssistant

    made = browser_speaker()
    assistant = LiveAssistant(config, models, speaker=made[0] if made else None)
    if made:
        bind_browser_speaker(assistant, made[1])
    return assistant


def decode_speaker_switch(body: dict) -> bool:
    on = body.get("on")
    if not isinstance(on, bool):
        raise ApiError(400, "'on' must be true or false", param="on")
    return on


def sse_line(event) -> str:
    """One Event as one SSE message."""
    return f"data: {event.to_json()}\n\n"


def create_demo_app(assistant: Any, settings: ServeSettings):
    """The demo's FastAPI app over a started (or about to be started) `LiveAssistant`."""
    fastapi = require("fastapi", "serve", "edge-mmm demo")
    from fastapi.responses import Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    files = _static_files()
    app = fastapi.FastAPI(title="edge-mmm demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.assistant, app.state.settings = assistant, settings
    subscribers = set()
    install_error_handlers(app)

    def page_route(path: str):
        data, media_type = files[path]

        async def page():
            return Response(data, media_type=media_type, headers=PAGE_HEADERS)

        app.get(path, include_in_schema=False)(page)

    for path in files:
        page_route(path)

    # the browser may be the camera / microphone only where the assistant has none of its own
    own = {"camera": assistant.config.camera is not None, "mic": assistant.config.mic is not None}

    def browser_source(kind: str) -> None:
        if own[kind]:
            raise ApiError(409, f"this demo reads its own {kind} (--{kind}); start it without --{kind} to send "
                                f"the browser's", code="source_in_use")

    voice = getattr(assistant, "voice", None)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "subscribers": len(subscribers),
                "sources": {kind: "server" if mine else "browser" for kind, mine in own.items()},
                "speaker": None if voice is None else voice.enabled}

    @app.post("/speaker")
    async def speaker(request: fastapi.Request):
        on = decode_speaker_switch(await json_body(request))
        if voice is None:
            raise ApiError(409, "this demo cannot speak: espeak-ng is not installed (Debian: apt-get install "
                                "espeak-ng)", code="no_speaker")
        voice.set_enabled(on)
        return {"speaker": voice.enabled}

    @app.get("/frame.jpg")
    async def frame_jpg():
        jpeg = await run_in_threadpool(assistant.latest_frame_jpeg)  # encodes: keep it off the event loop
        if not jpeg:
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/events")
    async def events():
        if len(subscribers) >= MAX_SUBSCRIBERS:
            raise ApiError(429, f"at most {MAX_SUBSCRIBERS} event streams at once; close one and retry",
                           code="too_many_streams")
        q = assistant.subscribe()
        subscribers.add(q)

        async def stream():
            loop = asyncio.get_running_loop()
            last = loop.time()
            try:
                yield ": connected\n\n"
                while True:
                    try:
                        event = q.get_nowait()
                    except queue.Empty:  # poll: waiting in q.get() would hold a worker thread per client
                        if loop.time() - last > KEEPALIVE_S:
                            last = loop.time()
                            yield ": keepalive\n\n"
                        await asyncio.sleep(POLL_S)
                        continue
                    last = loop.time()
                    yield sse_line(event)
            finally:  # the client went away (the response task is cancelled) or the server stops
                subscribers.discard(q)
                assistant.unsubscribe(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/ask", status_code=202)
    async def ask(request: fastapi.Request):
        text = decode_question(await json_body(request))
        await run_in_threadpool(assistant.ask_text, text)
        return {"status": "accepted", "text": text}

    @app.post("/audio", status_code=202)
    async def audio(request: fastapi.Request):
        browser_source("mic")
        samples = decode_audio(await request.body())
        await run_in_threadpool(assistant.feed_audio, samples)
        return {"status": "accepted", "samples": int(samples.size),
                "seconds": round(samples.size / SAMPLE_RATE, 4)}

    @app.post("/frame", status_code=202)
    async def frame(request: fastapi.Request):
        browser_source("camera")
        bgr = await run_in_threadpool(decode_frame, await request.body(), settings.max_image_pixels,
                                      settings.max_frame_pixels)
        await run_in_threadpool(assistant.feed_frame, bgr)
        return {"status": "accepted", "width": int(bgr.shape[1]), "height": int(bgr.shape[0])}

    # answers before routing: the key check and the body limit apply to every path but the static page
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       public_paths=files.keys(), content_types=CONTENT_TYPES)
    return app


def run_demo(assistant: Any, settings: ServeSettings) -> None:
    """Start the assistant, serve the page on settings.host:settings.port until interrupted, stop it."""
    uvicorn = require("uvicorn", "serve", "edge-mmm demo")
    app = create_demo_app(assistant, settings)
    assistant.start()
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                    timeout_graceful_shutdown=2)
    finally:
        assistant.stop()


__all__ = ["create_demo_app", "demo_assistant", "run_demo", "MAX_QUESTION_CHARS", "MAX_AUDIO_POST_S", "MAX_SUBSCRIBERS"]
