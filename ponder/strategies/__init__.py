"""Strategies by name: ``STRATEGIES`` maps each name to the ``Strategy`` its module declares (``registry.py``).

A strategy is ``async run(engine, question, *, n, params, seed, budget=None, prompt=DEFAULT_PROMPT, **options) ->
Result`` in a module of its own; the module docstring documents its options, which are keyword arguments of ``run``
(typed: ``check_options`` converts and validates them from the annotations). ``prompt`` (a
``ponder.prompts.MathPrompt``) is the chat the strategy opens for the question; callers pass it like ``n`` and
``params``, never as an option. Callers run a strategy through ``StrategyCall`` (``call.py``), which checks it all.
The ``config`` of the result ``run`` returns holds only what the strategy changed or computed (the sampling settings
it really used, a threshold it found); calling the ``Strategy`` adds the run's arguments (``registry.py``).

To add a strategy: write ``ponder/strategies/NAME.py`` with its ``run`` and, below it, its declaration
``STRATEGY = Strategy("NAME", run, "one-line summary", family, ...)`` (what replay and ``ponder report`` need to know
about it are fields of ``Strategy``), then list ``NAME.STRATEGY`` in ``STRATEGIES`` below, where the order is the
order of ``ponder strategies``.
"""

from __future__ import annotations

from ..engine.base import PonderError
from . import adaptive, auto, bon, deepconf, greedy, mix, pal, sc, short_mk
from . import cascade, glimprouter, specreason  # two models: a small and a large one
from . import astar, beam, dvts, particles  # step-level search
from .call import StrategyCall
from .registry import OptionError, Strategy

STRATEGIES: dict[str, Strategy] = {strategy.name: strategy for strategy in (
    auto.STRATEGY,  # the default
    greedy.STRATEGY, sc.STRATEGY, adaptive.STRATEGY, deepconf.STRATEGY, short_mk.STRATEGY, short_mk.FIRST_FINISH,
    bon.STRATEGY, pal.STRATEGY, mix.STRATEGY,
    cascade.STRATEGY, specreason.STRATEGY, glimprouter.STRATEGY,
    beam.STRATEGY, dvts.STRATEGY, particles.STRATEGY, astar.STRATEGY,
)}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PonderError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None


# The strategies that record a search tree (``ponder ask --tree``).
SEARCHES = tuple(name for name, strategy in STRATEGIES.items() if strategy.records_tree)


__all__ = ["SEARCHES", "STRATEGIES", "OptionError", "Strategy", "StrategyCall", "get_strategy"]
