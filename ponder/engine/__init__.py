"""Engines: ``load_engine`` picks one by name; strategies only see the ``Engine``/``Branch`` contract of ``base``."""

from __future__ import annotations

from .base import Branch, Engine, EngineStats, ModelInfo, PonderError, PromptTooLongError, SamplingParams, Usage

ENGINES = ("llamacpp", "openai")


def load_engine(model: str | None = None, *, engine: str = "llamacpp", base_url: list[str] | None = None,
                draft: str | None = None, **options) -> Engine:
    """The engine for ``model``: a bundled model name or GGUF path (llamacpp), or a served model name (openai).

    ``draft`` (llamacpp only) names a smaller model with the same vocabulary that drafts tokens for ``model``:
    speculative decoding, with exactly the output distribution of ``model`` alone."""
    if engine == "llamacpp":
        from ..models import DEFAULT_MODEL, resolve_model
        from .cpu_check import use_extra_buffers

        target = resolve_model(model or DEFAULT_MODEL)
        use_extra_buffers(target.path, threads=options.get("n_threads"))  # before this process imports llama.cpp
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(target, draft=draft and resolve_model(draft), **options)
    if draft is not None:
        raise PonderError("--draft is for the in-process engine; a remote server does its own speculative decoding "
                          "(e.g. vLLM's --speculative-config)")
    if engine == "openai":
        from .openai import OpenAIEngine

        if not base_url:
            raise PonderError("--engine openai needs --base-url (the server's URL, e.g. http://127.0.0.1:8080/v1)")
        return OpenAIEngine(base_urls=base_url, model=model, **options)
    raise PonderError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")


__all__ = ["Branch", "Engine", "EngineStats", "ModelInfo", "PonderError", "PromptTooLongError", "SamplingParams",
           "Usage", "load_engine"]
