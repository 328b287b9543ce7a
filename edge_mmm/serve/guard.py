"""Request guards: API key, body size, and one-generation-at-a-time admission with a bounded queue.

Errors leave in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Optional

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


class GuardMiddleware:
    """ASGI middleware: Bearer key check (when a key is set) and a hard cap on request body bytes."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None:
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
