"""Request guards: API key, body size, same-origin checks, and one-generation-at-a-time admission.

Without an API key (the loopback default) any web page the user visits could send requests to the server,
so then a request must also name a loopback Host (refuses DNS rebinding), carry no Origin or this server's
own, and send its body with the content type of its path (refuses the cross-site "simple" requests a
page may send without a CORS preflight: text/plain, form posts).

Errors leave in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Iterable, Mapping, Optional, Tuple

from edge_mmm.serve.settings import host_of, is_loopback

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error",
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


MAX_JSON_DEPTH = 32  # nesting of objects/arrays in a request body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> dict:
    """Bytes -> a JSON object; ApiError(400) for anything else: malformed, NaN/Infinity, integers over
    Python's digit limit, nesting deeper than MAX_JSON_DEPTH."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = str(exc) if "JSON number" in str(exc) or "digits" in str(exc) else "malformed"
        raise ApiError(400, f"request body is not valid JSON ({detail[:120]})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if _depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _depth(value, limit: int = MAX_JSON_DEPTH + 1) -> int:
    """Nesting depth of a parsed JSON value (stops counting past `limit`)."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(x for x in v.values() if isinstance(x, (dict, list)))
            elif isinstance(v, list):
                nxt.extend(x for x in v if isinstance(x, (dict, list)))
        level = nxt
    return depth


async def json_body(request) -> dict:
    """The request body as a JSON object, else ApiError(400)."""
    return parse_json(await request.body())


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


def same_origin_problem(headers: dict, method: str, path: str, content_types: Mapping[str, Tuple[str, ...]]
                        ) -> Optional[Tuple[int, str, str]]:
    """(status, message, code) when a keyless request is not plainly from this machine's own pages."""
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if not host or not is_loopback(host_of(host)):
        return 403, (f"Host header {host[:80]!r} is not a loopback name: without --api-key this server answers "
                     f"only requests addressed to 127.0.0.1/localhost (DNS rebinding is refused)"), "host_not_allowed"
    origin = headers.get(b"origin")
    if origin is not None:
        origin = origin.decode("latin-1").strip().lower()
        scheme, _, authority = origin.partition("://")
        if scheme not in ("http", "https") or authority != host:
            return 403, (f"cross-origin request from {origin[:80]!r} refused: without --api-key only this "
                         f"server's own page may call it"), "cross_origin"
    if method not in ("GET", "HEAD", "OPTIONS"):
        allowed = content_types.get(path, ("application/json",))
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype not in allowed:
            return 415, (f"Content-Type {ctype or 'missing'!r} is not accepted on {path}; send "
                         f"{' or '.join(allowed)}"), "unsupported_media_type"
    return None


class GuardMiddleware:
    """ASGI middleware: Bearer key check (when a key is set), else same-origin checks (`same_origin_problem`),
    and a hard cap on request body bytes.

    `public_paths`: GET paths answered without the key (static pages that hold no data, e.g. the demo page,
    which then sends the key itself on every request). `content_types`: the body types each POST path
    accepts when there is no key (default: application/json).
    """

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, public_paths: Iterable[str] = (),
                 content_types: Optional[Mapping[str, Tuple[str, ...]]] = None):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.public_paths = frozenset(public_paths)
        self.content_types = dict(content_types or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        public = scope["method"] in ("GET", "HEAD") and scope["path"] in self.public_paths
        if self.api_key is None:
            problem = same_origin_problem(headers, scope["method"], scope["path"], self.content_types)
            if problem is not None:
                return await _send_error(send, problem[0], problem[1], problem[2])
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
