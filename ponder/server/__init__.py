"""ponder's OpenAI-compatible HTTP server: ``create_app(engine)`` (FastAPI) and the ``ponder serve`` command."""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
