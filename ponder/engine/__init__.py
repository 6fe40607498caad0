"""Engines: ``load_engine`` picks one by name; strategies only see the ``Engine``/``Branch`` contract of ``base``."""

from __future__ import annotations

from .base import Branch, Engine, EngineStats, ModelInfo, PonderError, PromptTooLongError, SamplingParams, Usage

ENGINES = ("llamacpp", "openai")


def load_engine(model: str | None = None, *, engine: str = "llamacpp", base_url: list[str] | None = None,
                **options) -> Engine:
    """The engine for ``model``: a bundled model name or GGUF path (llamacpp), or a served model name (openai)."""
    if engine == "llamacpp":
        from ..models import DEFAULT_MODEL, resolve_model
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(resolve_model(model or DEFAULT_MODEL), **options)
    if engine == "openai":
        from .openai import OpenAIEngine

        if not base_url:
            raise PonderError("--engine openai needs --base-url (the server's URL, e.g. http://127.0.0.1:8080/v1)")
        return OpenAIEngine(base_urls=base_url, model=model, **options)
    raise PonderError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")


__all__ = ["Branch", "Engine", "EngineStats", "ModelInfo", "PonderError", "PromptTooLongError", "SamplingParams",
           "Usage", "load_engine"]
