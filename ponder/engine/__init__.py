"""Engines. Strategies only see the ``Engine``/``Branch`` contract of ``base``; ``ponder.models.load_engine`` builds
an engine (``llamacpp``: the in-process one, ``remote``: OpenAI-compatible servers, ``fake``: the tests')."""

from __future__ import annotations

from .base import Branch, Engine, EngineStats, ModelInfo, PonderError, PromptTooLongError, SamplingParams, Usage

__all__ = ["Branch", "Engine", "EngineStats", "ModelInfo", "PonderError", "PromptTooLongError", "SamplingParams",
           "Usage"]
