"""Bounds and refusals: key, body size, malformed input, a full queue; every error is OpenAI-shaped JSON."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edge_mmm.errors import InputError
from edge_mmm.serve.settings import ServeSettings

from .conftest import API_KEY, MAX_BODY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _chat(content="Hi", **kw):
    return {"model": "x", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "temperature": 0, **kw}


def _assert_error(r: httpx.Response, status: int):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type"} and body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_non_loopback_needs_key():
    with pytest.raises(InputError, match="api-key"):
        ServeSettings(host="0.0.0.0")
    ServeSettings(host="0.0.0.0", api_key="a-long-enough-key")
    ServeSettings(host="::1")
    assert ServeSettings().host == "127.0.0.1"


def test_cli_refuses_exposed_host_without_key(capsys):
    from edge_mmm.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "9"]) == 2  # refused before loading anything
    assert "--api-key" in capsys.readouterr().err


def test_missing_or_wrong_key_is_401(server):
    url, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong-key-xxxx"}, {"Authorization": API_KEY}):
        _assert_error(httpx.post(url + "/v1/chat/completions", json=_chat(), headers=headers), 401)
        _assert_error(httpx.get(url + "/v1/models", headers=headers), 401)


def test_oversized_body_is_413(server):
    url, _ = server
    big = _chat("a" * (MAX_BODY + 10))
    _assert_error(httpx.post(url + "/v1/chat/completions", json=big, headers=AUTH), 413)

    def chunked():  # no Content-Length: the limit is enforced while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    _assert_error(httpx.post(url + "/v1/chat/completions", content=chunked(),
                             headers={**AUTH, "Content-Type": "application/json"}), 413)
    _assert_error(httpx.post(url + "/v1/audio/transcriptions", headers=AUTH,
                             files={"file": ("a.wav", b"\0" * (MAX_BODY + 10), "audio/wav")}), 413)


def _png(w=8, h=8) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b"",
    json.dumps({"messages": []}).encode(),
    json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
    json.dumps(_chat(max_tokens="ten")).encode(),
    json.dumps(_chat(max_tokens=0)).encode(),
    json.dumps(_chat(temperature=-1)).encode(),
    json.dumps(_chat(stream="yes")).encode(),
    json.dumps(_chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}])).encode(),
    json.dumps(_chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}])).encode(),
    json.dumps(_chat([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])).encode(),
    json.dumps(_chat([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}])).encode(),
    json.dumps(_chat([{"type": "audio", "data": "x"}])).encode(),
], ids=["truncated", "array", "empty", "no-messages", "bad-role", "max-tokens-type", "max-tokens-0",
        "temperature", "stream-type", "bad-base64", "not-an-image", "file-url", "remote-url", "bad-part"])
def test_malformed_chat_is_400(server, body):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", content=body,
                   headers={**AUTH, "Content-Type": "application/json"})
    _assert_error(r, 400)


def test_image_without_vlm_and_too_many_pixels_are_400(server):
    url, settings = server
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                   json=_chat([{"type": "image_url", "image_url": {"url": _png()}}]))
    _assert_error(r, 400)
    assert "vision model" in r.json()["error"]["message"]
    side = int(settings.max_image_pixels ** 0.5) + 1
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                   json=_chat([{"type": "image_url", "image_url": {"url": _png(side, side)}}]))
    _assert_error(r, 400)
    assert r.json()["error"]["code"] == "image_too_large"


def test_bad_uploads_are_400_and_unknown_path_404(server):
    url, _ = server
    _assert_error(httpx.post(url + "/v1/audio/transcriptions", headers=AUTH,
                             files={"file": ("a.wav", b"this is not audio", "audio/wav")}), 400)
    _assert_error(httpx.post(url + "/v1/audio/transcriptions", headers=AUTH, data={"model": "x"}), 400)
    _assert_error(httpx.post(url + "/v1/audio/transcriptions", headers=AUTH, content=b"raw"), 400)
    _assert_error(httpx.get(url + "/v1/nothing", headers=AUTH), 404)


def test_fifty_concurrent_requests_bounded(server):
    url, settings = server

    def one(i):
        with httpx.Client(timeout=120) as c:
            return c.post(url + "/v1/chat/completions", headers=AUTH,
                          json=_chat(f"Say {i}.", stream=bool(i % 2))).status_code

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, range(50)))
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 1 and codes.count(429) >= 1  # the queue (size 4) bounded the burst
    assert codes.count(200) <= 50
    # still healthy: the queue drained, a normal request succeeds
    health = httpx.get(url + "/health", headers=AUTH).json()
    assert health == {"status": "ok", "in_flight": 0}
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=_chat("Hello"))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_model_level_errors_are_400(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=_chat("hello " * 3000))  # > 2048-token context
    _assert_error(r, 400)
    assert "context holds" in r.json()["error"]["message"]


def test_dropped_stream_frees_its_slot(server):
    url, _ = server
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", headers=AUTH,
                      json=_chat("Tell me a long story.", stream=True, max_tokens=64)) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # read the first event, then hang up
    import time

    deadline = time.monotonic() + 60
    while httpx.get(url + "/health", headers=AUTH).json()["in_flight"] != 0:
        assert time.monotonic() < deadline, "the dropped stream never released the model"
        time.sleep(0.2)
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=_chat("Hello"))
    assert r.status_code == 200
