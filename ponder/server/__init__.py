"""ponder's OpenAI-compatible HTTP server: ``create_app(engine, ServerConfig(...))`` (FastAPI) and ``ponder serve``.

FastAPI, uvicorn and prometheus-client are an optional extra (``pip install "ponder[server]"``), so importing this
package (the CLI does, to register ``ponder serve``) must not import them: ``create_app`` is imported on first use.
"""

from .config import ServerConfig


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServerConfig", "create_app"]
