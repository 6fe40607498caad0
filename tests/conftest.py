"""Shared fixtures. The real engine is loaded once per test session (about a second) and shared by model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_engine():
    """The bundled 0.5B on the llama.cpp engine, with a small context so KV-pressure tests are quick to set up."""
    from ponder.models import load_engine

    engine = load_engine("qwen2.5-0.5b", n_ctx=4096, n_seq_max=32)
    yield engine
    engine.close()
