"""ponder: an inference-time compute engine for LLM reasoning.

    import ponder
    result = ponder.ask("What is 17 * 23?")               # auto, on the model its profile names (the 1.5B)
    result = ponder.ask("What is 17 * 23?", strategy="sc", n=8)
    print(result.answer, result.votes, result.usage)
"""

from __future__ import annotations

import asyncio

from .engine import Engine, PonderError, SamplingParams
from .models import load_engine
from .prompts import DEFAULT_TEMPLATE, MathPrompt
from .result import Result

__version__ = "0.1.0"

_engines: dict[tuple, Engine] = {}


def get_engine(model: str | None = None, *, engine: str = "llamacpp", base_url: list[str] | None = None,
               draft: str | None = None) -> Engine:
    """The engine for ``model`` (with ``draft`` drafting for it, if given), loaded once per process and reused by
    later calls. Other models a strategy asks for (a judge, the large model of a cascade) load into the same engine."""
    key = (model, engine, tuple(base_url or ()), draft)
    if key not in _engines:
        _engines[key] = load_engine(model, engine=engine, base_url=base_url, draft=draft)
    return _engines[key]


async def ask_async(question: str, strategy: str = "auto", n: int = 8, model: str | None = None, *,
                    temperature: float = 0.7, top_p: float = 0.95, top_k: int = 40, max_tokens: int = 1024,
                    seed: int | None = None, engine: Engine | None = None, draft: str | None = None,
                    system: str | None = None, prompt_template: str = DEFAULT_TEMPLATE, **options) -> Result:
    """``ask`` for code that already runs an event loop (a server, a notebook)."""
    from .strategies import StrategyCall  # here, not at the top: the strategies pull in scipy

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens).validate()
    call = StrategyCall(strategy, question, n=n, params=params, seed=seed, prompt=MathPrompt(system, prompt_template),
                        options=options)
    return await call(engine or get_engine(call.strategy.model_to_load(model, call.options), draft=draft))


def ask(question: str, strategy: str = "auto", n: int = 8, model: str | None = None, **kwargs) -> Result:
    """Answer ``question`` with ``strategy`` (``auto`` by default, as ``ponder ask``) over ``n`` branches of ``model``
    (by default the model the strategy prefers -- ``auto``'s profile names the bundled 1.5B -- else the bundled 0.5B).

    Keyword arguments: ``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``seed``, ``draft`` (a smaller model
    that drafts for ``model``: speculative decoding), ``engine`` (an Engine to use instead of loading ``model``),
    ``system`` (a system message; default none, so the model's default one), ``prompt_template`` (the user turn,
    ``{question}`` where the question goes; default: the question, then the instruction to reason step by step and
    box the answer), and any option of the strategy: checked and converted as ``ponder ask --option`` does (an
    option the strategy does not take, or a value of the wrong type, is a ``PonderError``; ``threshold="0.9"`` is
    0.9).
    """
    return asyncio.run(ask_async(question, strategy, n, model, **kwargs))


__all__ = ["Engine", "PonderError", "Result", "SamplingParams", "__version__", "ask", "ask_async", "get_engine",
           "load_engine"]
