"""Request guards: API key, body size, and one-generation-at-a-time admission with a bounded queue.

Errors leave in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Iterable, Optional

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class ApiError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


async def _send_error(send, status: int, message: str, code: Optional[str] = None, headers=()) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def json_body(request) -> dict:
    """The request body as a JSON object, else ApiError(400)."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def install_error_handlers(app) -> None:
    """Every error from `app` leaves as OpenAI-shaped JSON: ApiError with its status, EdgeMMMError and request
    validation as 400, HTTP errors (404, 405) with theirs, anything else as 500 naming only the class."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from edge_mmm.errors import EdgeMMMError

    def err(status: int, message: str, param=None, code=None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return err(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(EdgeMMMError)
    async def _edge_error(request, exc: EdgeMMMError):
        return err(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return err(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return err(400, "invalid request: " + "; ".join(str(e.get("msg", e)) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        return err(500, f"internal error ({exc.__class__.__name__})")


class GuardMiddleware:
    """ASGI middleware: Bearer key check (when a key is set) and a hard cap on request body bytes.

    `public_paths`: GET paths answered without the key (static pages that hold no data, e.g. the demo page,
    which then sends the key itself on every request).
    """

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, public_paths: Iterable[str] = ()):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        public = scope["method"] in ("GET", "HEAD") and scope["path"] in self.public_paths
        if self.api_key is not None and not public:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await _send_error(send, 401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                         "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_error(send, 413, f"request body is over the {self.max_body} byte limit",
                                         "body_too_large")
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # chunked upload without a Content-Length
                    raise ApiError(413, f"request body is over the {self.max_body} byte limit", code="body_too_large")
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except ApiError as exc:  # raised while reading the body, outside the app's handlers
            if not started:
                await _send_error(send, exc.status, exc.message, exc.code)


class Admission:
    """At most one generation runs; up to `queue_size` more wait; beyond that a request gets 429 at once."""

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.in_flight = 0  # running + waiting
        self._lock: Optional[asyncio.Lock] = None

    async def __aenter__(self):
        if self.in_flight >= 1 + self.queue_size:
            raise ApiError(429, f"the server is busy ({self.in_flight} requests running or queued); retry later",
                           code="server_busy")
        if self._lock is None:  # created inside the server's event loop
            self._lock = asyncio.Lock()
        self.in_flight += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self.in_flight -= 1
            raise
        return self

    async def __aexit__(self, *exc):
        self._lock.release()
        self.in_flight -= 1
        return False
