"""One strategy run, its arguments checked: what ``ponder.ask``, ``ponder ask``, the bench runner and the server each
build from their own input, then await on an engine. Building it is where every caller's input is validated, the
same way: an unknown strategy, an empty question, ``n`` below 1, and an option the strategy does not take or of the
wrong type (converted when it fits, e.g. ``"0.9"`` -> ``0.9``) are ``PonderError``s (``OptionError`` for options)."""

from __future__ import annotations

from typing import Any, Mapping

from ..engine.base import Engine, PonderError, SamplingParams
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from .registry import Strategy


class StrategyCall:
    def __init__(self, strategy: str | Strategy, question: str, *, n: int, params: SamplingParams = SamplingParams(),
                 seed: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT, options: Mapping[str, Any] = {}):
        from . import get_strategy  # here, not at the top: the package imports this module before it is complete

        self.strategy = strategy if isinstance(strategy, Strategy) else get_strategy(strategy)
        if not question or not question.strip():
            raise PonderError("the question is empty")
        if n < 1:
            raise PonderError(f"n must be at least 1, got {n}")
        self.question = question
        self.n = n
        self.params = params
        self.seed = seed
        self.prompt = prompt
        self.options = self.strategy.check_options(options)

    async def __call__(self, engine: Engine) -> Result:
        return await self.strategy(engine, self.question, n=self.n, params=self.params, seed=self.seed,
                                   prompt=self.prompt, **self.options)
