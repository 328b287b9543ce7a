"""OpenAI-compatible HTTP server (FastAPI + uvicorn; the `serve` extra)."""

from edge_mmm.serve.settings import ServeSettings, is_loopback

__all__ = ["ServeSettings", "is_loopback", "create_app", "serve"]


def __getattr__(name):
    # fastapi is optional: import the app module only when it is asked for
    if name in ("create_app", "serve", "load_models", "Models"):
        from edge_mmm.serve import app

        return getattr(app, name)
    raise AttributeError(name)
