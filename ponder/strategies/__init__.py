"""Strategies by name. Each is ``async run(engine, question, *, n, params, seed, budget=None, prompt=DEFAULT_PROMPT,
**options) -> Result`` in a module of its own; the module docstring documents its options, which are keyword
arguments of ``run``. ``prompt`` (a ``ponder.prompts.MathPrompt``: system message and user-turn template) is the chat
the strategy opens for the question; callers pass it like ``n`` and ``params``, never as an option."""

from __future__ import annotations

from ..engine.base import PonderError
from . import adaptive, bon, deepconf, greedy, mix, pal, sc, short_mk
from . import cascade, glimprouter, specreason  # two models: a small and a large one
from . import astar, beam, dvts, particles  # step-level search

STRATEGIES = {
    "greedy": greedy.run,
    "sc": sc.run,
    "adaptive": adaptive.run,
    "deepconf": deepconf.run,
    "short-m@k": short_mk.run,
    "first-finish": short_mk.first_finish,
    "bon": bon.run,
    "pal": pal.run,
    "mix": mix.run,
    "cascade": cascade.run,
    "specreason": specreason.run,
    "glimprouter": glimprouter.run,
    "beam": beam.run,
    "dvts": dvts.run,
    "particles": particles.run,
    "astar": astar.run,
}

SEARCHES = ("beam", "dvts", "particles", "astar")  # they record the search tree (ponder ask --tree)

DESCRIPTIONS = {
    "greedy": "one branch at temperature 0",
    "sc": "self-consistency: n samples, majority vote (or weighted: logprob, self-certainty, rpc)",
    "adaptive": "Adaptive-Consistency: add samples only while the vote is unsettled (Beta/Dirichlet rule)",
    "deepconf": "DeepConf: confidence-filtered weighted vote; online mode cancels low-confidence branches mid-decode",
    "short-m@k": "run n branches, stop when m have finished, vote among those m",
    "first-finish": "run n branches, answer with the first to finish (short-1@k)",
    "bon": "best-of-n: the candidate a verifier (self, judge or program) scores highest",
    "pal": "program-aided: n Python programs run in the sandbox as they finish, their printed answers vote",
    "mix": "chain-of-thought and program branches (half and half) in one vote",
    "cascade": "the small model samples k answers; below tau agreement the question escalates to the large model",
    "specreason": "the small model drafts each step, the large one scores it (0-9) and rewrites low-scored steps",
    "glimprouter": "per step, the small model's first-token entropy decides which model writes the step",
    "beam": "beam search over steps: n // m beams, m scored candidate steps each, the best kept",
    "dvts": "diverse verifier tree search: n // m independent subtrees, each keeps its best scored step",
    "particles": "particle filtering: n partial solutions, resampled by their step scores after every step",
    "astar": "A*-decoding: best-first over partial solutions by step cost + (1 - score), n steps per expansion",
}


def get_strategy(name: str):
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PonderError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None
