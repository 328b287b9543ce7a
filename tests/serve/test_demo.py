"""The demo app over HTTP (a real uvicorn on 127.0.0.1): the page, the SSE event stream, typed questions,
browser audio/frames, and the same key/body/error rules as `edge-mmm serve`.

The assistant here is a recording double of `LiveAssistant`'s surface over the real `EventBus`; the real
pipeline behind this app is exercised in test_demo_browser.py.
"""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import numpy as np
import pytest

from edge_mmm.runtime.assistant import LiveConfig
from edge_mmm.runtime.events import EventBus
from edge_mmm.serve import demo
from edge_mmm.serve.settings import ServeSettings

from .conftest import free_port, running

KEY = "demo-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 1_000_000


class RecordingAssistant:
    """What create_demo_app calls, recorded; a typed question is answered with a scripted event stream."""

    def __init__(self, answer=("The ", "sky ", "is ", "blue."), config=None):
        self.config = config or LiveConfig()  # no camera, no microphone: the browser may send both
        self.bus = EventBus()
        self.answer = answer
        self.asked, self.audio, self.frames = [], [], []
        self.jpeg = None

    def subscribe(self):
        return self.bus.subscribe()

    def unsubscribe(self, q):
        self.bus.unsubscribe(q)

    def subscribers(self) -> int:
        return len(self.bus._queues)

    def latest_frame_jpeg(self):
        return self.jpeg

    def feed_audio(self, samples):
        self.audio.append(samples)

    def feed_frame(self, bgr):
        self.frames.append(bgr)

    def ask_text(self, text):
        self.asked.append(text)
        self.bus.publish("transcript.final", text=text, source="text")

        def answer():  # the real assistant answers on its own thread, after ask_text returned
            turn = len(self.asked)
            for piece in self.answer:
                time.sleep(0.01)
                self.bus.publish("answer.delta", text=piece, turn=turn)
            self.bus.publish("answer.done", text="".join(self.answer), turn=turn, finish_reason="stop",
                             cancelled=False)
            self.bus.publish("timing", stage="turn", ttft_s=0.12, prefill_s=0.05)

        threading.Thread(target=answer, daemon=True).start()


def _jpeg(w=64, h=48, rgb=(200, 30, 30), fmt="JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), rgb).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def keyed():
    """(base_url, assistant) of a key-protected demo app."""
    assistant = RecordingAssistant()
    settings = ServeSettings(port=free_port(), api_key=KEY, max_body_bytes=MAX_BODY, max_image_pixels=640 * 480)
    with running(demo.create_demo_app(assistant, settings), settings.port) as url:
        yield url, assistant


@pytest.fixture
def open_app():
    """(base_url, assistant) of a loopback demo app without a key (the default)."""
    assistant = RecordingAssistant()
    settings = ServeSettings(port=free_port(), max_body_bytes=MAX_BODY)
    with running(demo.create_demo_app(assistant, settings), settings.port) as url:
        yield url, assistant


def _assert_error(r: httpx.Response, status: int, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    assert "Traceback" not in r.text


def test_page_and_assets_are_served_without_key_and_load_nothing_external(keyed):
    url, _ = keyed
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="camera"', 'id="turns"', 'id="partial"', 'id="ask-form"', 'id="latency"',
                    'id="use-browser"', 'src="demo.js"', 'href="demo.css"'):
        assert element in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = httpx.get(url + "/demo.js")
    css = httpx.get(url + "/demo.css")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert css.status_code == 200 and "css" in css.headers["content-type"]
    for text in (page.text, js.text, css.text):  # a device has no internet: no CDN, no web font
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    # the static page is the only thing without the key: its POST and every other path need it
    _assert_error(httpx.post(url + "/", content=b"x"), 401)


@pytest.mark.parametrize("method,path", [("GET", "/events"), ("GET", "/frame.jpg"), ("GET", "/healthz"),
                                         ("POST", "/ask"), ("POST", "/audio"), ("POST", "/frame")])
def test_every_data_path_needs_the_key(keyed, method, path):
    url, assistant = keyed
    for headers in ({}, {"Authorization": "Bearer wrong-key-000000"}, {"Authorization": KEY}):
        _assert_error(httpx.request(method, url + path, headers=headers, json={"text": "hi"}), 401)
    assert assistant.asked == [] and assistant.audio == [] and assistant.frames == []
    assert assistant.subscribers() == 0


def test_exposed_host_needs_key_like_serve(capsys):
    from edge_mmm.cli import main

    assert main(["demo", "--host", "0.0.0.0", "--port", "9"]) == 2  # refused before any model loads
    assert "--api-key" in capsys.readouterr().err
    assert main(["demo", "--host", "0.0.0.0", "--api-key", "short"]) == 2
    assert "at least 8" in capsys.readouterr().err


def test_frame_jpg_is_204_until_a_frame_then_the_jpeg(keyed):
    url, assistant = keyed
    r = httpx.get(url + "/frame.jpg", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assistant.jpeg = _jpeg()
    r = httpx.get(url + "/frame.jpg", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == assistant.jpeg and r.headers["cache-control"] == "no-store"


def _read_events(response, until: str, limit_s: float = 20.0):
    """Parse SSE `data:` lines into dicts until an event of type `until` (comments are skipped)."""
    events, deadline = [], time.monotonic() + limit_s
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if events[-1]["type"] == until:
                return events
        assert time.monotonic() < deadline, f"no {until!r} event within {limit_s} s: {events}"
    raise AssertionError(f"stream ended before {until!r}: {events}")


def test_sse_streams_the_answer_to_a_typed_question(keyed):
    url, assistant = keyed
    with httpx.Client(timeout=30) as client, client.stream("GET", url + "/events", headers=AUTH) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 10
        while assistant.subscribers() == 0:  # subscribed once the response has started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert health(client, url)["subscribers"] == 1
        r = client.post(url + "/ask", headers=AUTH, json={"text": "  What colour is the sky?  "})
        assert r.status_code == 202 and r.json()["text"] == "What colour is the sky?"
        events = _read_events(stream, "answer.done")  # leaving iter_lines early closes the connection
    assert assistant.asked == ["What colour is the sky?"]
    deltas = [e for e in events if e["type"] == "answer.delta"]
    assert [e["data"]["text"] for e in deltas] == list(assistant.answer)  # every delta, in order
    assert events[-1]["data"]["text"] == "The sky is blue."
    assert all(set(e) == {"type", "data", "t"} and isinstance(e["t"], float) for e in events)
    deadline = time.monotonic() + 10
    while assistant.subscribers():  # the client went away: the server unsubscribed its queue
        assert time.monotonic() < deadline, "queue still subscribed after the client disconnected"
        time.sleep(0.05)


def health(client, url):
    r = client.get(url + "/healthz", headers=AUTH)
    assert r.status_code == 200
    return r.json()


def test_event_streams_are_bounded(keyed, monkeypatch):
    url, assistant = keyed
    monkeypatch.setattr(demo, "MAX_SUBSCRIBERS", 1)
    with httpx.Client(timeout=30) as client, client.stream("GET", url + "/events", headers=AUTH) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines) == ": connected"
        _assert_error(client.get(url + "/events", headers=AUTH), 429)
        assert assistant.subscribers() == 1


@pytest.mark.parametrize("body,param", [
    (b"{not json", None), (b"[1]", None), (b"", None), (json.dumps({}).encode(), "text"),
    (json.dumps({"text": 5}).encode(), "text"), (json.dumps({"text": "   "}).encode(), "text"),
    (json.dumps({"text": "a" * (demo.MAX_QUESTION_CHARS + 1)}).encode(), "text"),
], ids=["truncated", "array", "empty", "no-text", "not-string", "blank", "too-long"])
def test_bad_questions_are_400(keyed, body, param):
    url, assistant = keyed
    r = httpx.post(url + "/ask", content=body, headers={**AUTH, "Content-Type": "application/json"})
    _assert_error(r, 400, param)
    assert assistant.asked == []


def test_oversized_bodies_are_413(keyed):
    url, assistant = keyed
    for path in ("/ask", "/audio", "/frame"):
        _assert_error(httpx.post(url + path, content=b"\0" * (MAX_BODY + 4), headers=AUTH), 413)
    assert assistant.asked == [] and assistant.audio == [] and assistant.frames == []


def test_browser_audio_is_fed_as_float32(open_app):
    url, assistant = open_app
    assert httpx.get(url + "/healthz").json()["sources"] == {"camera": "browser", "mic": "browser"}
    samples = (0.5 * np.sin(np.arange(3200) / 8)).astype("<f4")
    r = httpx.post(url + "/audio", content=samples.tobytes(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202 and r.json() == {"status": "accepted", "samples": 3200, "seconds": 0.2}
    assert len(assistant.audio) == 1
    np.testing.assert_array_equal(assistant.audio[0], samples)
    assert assistant.audio[0].dtype == np.float32


@pytest.mark.parametrize("raw", [b"", b"\0\0\0", np.array([0.1, np.nan], "<f4").tobytes(),
                                 np.zeros(int(demo.MAX_AUDIO_POST_S * 16000) + 1, "<f4").tobytes()],
                         ids=["empty", "partial-sample", "nan", "too-long"])
def test_bad_audio_is_400(open_app, raw):
    url, assistant = open_app
    _assert_error(httpx.post(url + "/audio", content=raw, headers={"Content-Type": "application/octet-stream"}), 400)
    assert assistant.audio == []


def test_browser_frame_becomes_a_bgr_array(open_app):
    url, assistant = open_app
    r = httpx.post(url + "/frame", content=_jpeg(64, 48, (255, 0, 0), fmt="PNG"), headers={"Content-Type": "image/png"})
    assert r.status_code == 202 and r.json()["width"] == 64 and r.json()["height"] == 48
    (frame,) = assistant.frames
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    assert frame[0, 0].tolist() == [0, 0, 255]  # red in OpenCV's BGR order, as a camera delivers it


def test_bad_frames_are_400(keyed):
    url, assistant = keyed
    _assert_error(httpx.post(url + "/frame", content=b"not an image", headers=AUTH), 400)
    _assert_error(httpx.post(url + "/frame", content=b"", headers=AUTH), 400)
    r = httpx.post(url + "/frame", content=_jpeg(800, 600), headers=AUTH)  # over 640x480 pixels
    _assert_error(r, 400)
    assert r.json()["error"]["code"] == "image_too_large"
    assert assistant.frames == []


def test_unknown_path_and_method_are_json_errors(open_app):
    url, _ = open_app
    _assert_error(httpx.get(url + "/nothing"), 404)
    _assert_error(httpx.get(url + "/ask"), 405)
    _assert_error(httpx.get(url + "/../../etc/passwd"), 404)


def test_browser_sources_only_where_the_server_has_none():
    assistant = RecordingAssistant(config=LiveConfig(camera="0", mic="default"))
    settings = ServeSettings(port=free_port())
    with running(demo.create_demo_app(assistant, settings), settings.port) as url:
        assert httpx.get(url + "/healthz").json()["sources"] == {"camera": "server", "mic": "server"}
        _assert_error(httpx.post(url + "/frame", content=_jpeg(), headers={"Content-Type": "image/jpeg"}), 409)
        _assert_error(httpx.post(url + "/audio", content=np.zeros(160, "<f4").tobytes(),
                                 headers={"Content-Type": "application/octet-stream"}), 409)
    assert assistant.frames == [] and assistant.audio == []


def test_speaker_switch_is_409_without_a_speaker_and_400_on_a_bad_body(open_app):
    url, _ = open_app
    assert httpx.get(url + "/healthz").json()["speaker"] is None
    _assert_error(httpx.post(url + "/speaker", json={"on": "yes"}), 400, param="on")
    r = httpx.post(url + "/speaker", json={"on": True})
    _assert_error(r, 409)
    assert "espeak-ng" in r.json()["error"]["message"]


def test_speaker_switch_speaks_the_answer_as_paced_speech_audio_events():
    """The double's bus with the demo's real browser speaker (espeak-ng -> BrowserSink -> speech.audio)."""
    import base64
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    from edge_mmm.runtime.spoken import SpokenAnswers

    assistant = RecordingAssistant(answer=("Hello ", "there, ", "the sky ", "is blue today."))
    speaker, sink = demo.browser_speaker()
    assistant.voice = SpokenAnswers(speaker, assistant.bus)
    demo.bind_browser_speaker(assistant, sink)
    assistant.voice.start()
    settings = ServeSettings(port=free_port(), max_body_bytes=MAX_BODY)
    q = assistant.subscribe()
    try:
        with running(demo.create_demo_app(assistant, settings), settings.port) as url:
            assistant.ask_text("Quiet?")  # speaker off: nothing is spoken
            time.sleep(0.5)
            assert httpx.get(url + "/healthz").json()["speaker"] is False
            r = httpx.post(url + "/speaker", json={"on": True})
            assert r.status_code == 200 and r.json() == {"speaker": True}
            assistant.ask_text("Loud?")
            deadline, audio, t = time.monotonic() + 20, [], []
            while time.monotonic() < deadline and not (audio and not speaker.is_playing()):
                try:
                    e = q.get(timeout=0.1)
                except Exception:  # noqa: BLE001 - queue.Empty
                    continue
                if e.type == "speech.audio":
                    audio.append(np.frombuffer(base64.b64decode(e.data["pcm"]), "<i2"))
                    t.append(time.monotonic())
                    assert e.data["rate"] == speaker.tts.sample_rate
            assert httpx.post(url + "/speaker", json={"on": False}).json() == {"speaker": False}
    finally:
        assert assistant.voice.close(2.0)
    pcm = np.concatenate(audio)
    seconds = pcm.size / speaker.tts.sample_rate
    assert 1.0 < seconds < 6.0 and np.abs(pcm).max() > 3000  # the answer, spoken once
    assert [s for _, s in speaker.spoken] == ["Hello there, the sky is blue", "today."]  # first 6 words, then the rest
    assert t[-1] - t[0] > 0.6 * seconds  # paced in real time, not sent in one burst
