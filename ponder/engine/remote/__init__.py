"""The remote engine: the Branch API over OpenAI-compatible servers (vLLM, SGLang, llama.cpp's server,
llama-cpp-python's server). ``engine.py`` maps branches onto ``/v1/completions`` requests; ``transport.py`` sends
them: which server, retries, servers set aside, capability probes."""

try:
    import openai  # noqa: F401
except ModuleNotFoundError as e:  # the client is an optional extra: only --engine openai needs it
    if e.name != "openai":
        raise
    from ..base import PonderError

    raise PonderError('--engine openai needs the optional openai client: pip install "ponder[remote]"') from None

from .engine import OpenAIEngine

__all__ = ["OpenAIEngine"]
