"""What a strategy declares about itself, once, beside its ``run``: ``Strategy``.

A strategy's options are the keyword-only parameters of its ``run`` that the caller does not fill in (everything but
``engine``, ``question``, ``n``, ``params``, ``seed`` and ``prompt``); ``check_options`` validates and converts given
options against them and their annotations, for every caller (the CLI's ``--option``, the Python API's keywords, a
server request's ``ponder`` object, a bench config).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Awaitable, Callable, Mapping

from pydantic import TypeAdapter, ValidationError

from ..engine.base import Engine, Message, PonderError, SamplingParams
from ..prompts import MathPrompt
from ..result import Result

# What a strategy does with its branches; "search" strategies also record the search tree (``details["tree"]``,
# drawn by ``ponder ask --tree``).
FAMILIES = ("vote", "verify", "program", "two models", "search")

CALLER_ARGUMENTS = ("engine", "question", "n", "params", "seed", "prompt")  # given by the caller, never as an option


class OptionError(PonderError):
    """A strategy option that the strategy does not take, or a value of the wrong type."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def math_chat(question: str, prompt: MathPrompt) -> list[Message]:
    return prompt.messages(question)


def as_given(params: SamplingParams) -> SamplingParams:
    return params


def sampling_config(params: SamplingParams) -> dict[str, Any]:
    """The sampling settings a result's ``config`` records: all of ``params`` but the seed (the run's seed is
    recorded on its own, each branch samples with a seed derived from it)."""
    return {k: v for k, v in vars(params).items() if k != "seed"}


@dataclass(frozen=True, eq=False)
class Strategy:
    """A strategy as its module declares it. Calling it runs ``run`` (same signature) and completes the result's
    ``config`` with the run's arguments, defaults included: a strategy's own ``config`` holds only what it changed
    or computed."""

    name: str
    run: Callable[..., Awaitable[Result]]
    summary: str  # one line, for ``ponder strategies``; the module docstring documents the options
    family: str  # one of FAMILIES
    # Only for these does a k-subset of a run's branches stand for a run with k samples: N independent samples of
    # one prompt, so ``ponder report`` gives them maj@k / pass@k curves.
    independent_samples: bool = False
    # What a replay (``ponder.bench.replay``) needs to find a recording's branches: the chat the strategy opens for
    # a question under the run's prompt, the sampling settings its branches extend with given the run's, and the
    # temperature it samples at whatever the run's is (greedy's 0).
    chat: Callable[[str, MathPrompt], list[Message]] = math_chat
    branch_params: Callable[[SamplingParams], SamplingParams] = as_given
    temperature: float | None = None
    # The model a caller loads as the engine's own when the user names none, given the run's options (None: the
    # bundled default). ``auto`` names its profile's model, so that its arms do not load a second one.
    preferred_model: Callable[[Mapping[str, Any]], str | None] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"strategy {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def records_tree(self) -> bool:
        return self.family == "search"

    def model_to_load(self, named: str | None, options: Mapping[str, Any] = {}) -> str | None:
        """The model a caller loads as the in-process engine's own: the one the user named, else the one this
        strategy prefers given its options (``auto``: its profile's), else None (the bundled default). ``ponder.ask``
        and ``ponder ask`` ask here; ``ponder serve`` serves the model ``--model`` names (default: the bundled default),
        and ``auto`` loads its profile's model beside it."""
        if named is not None or self.preferred_model is None:
            return named
        return self.preferred_model(options)

    @cached_property
    def __signature__(self) -> inspect.Signature:  # inspect.signature(strategy) is its run's
        return inspect.signature(self.run)

    @cached_property
    def options(self) -> dict[str, inspect.Parameter]:
        """The options ``run`` takes, by name, in signature order."""
        return {name: p for name, p in self.__signature__.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in CALLER_ARGUMENTS}

    @cached_property
    def _types(self) -> dict[str, TypeAdapter]:
        hints = typing.get_type_hints(self.run)
        return {name: TypeAdapter(hints.get(name, Any)) for name in self.options}

    def check_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` checked against ``options``: names ``run`` takes, values of the annotated type (converted, e.g.
        "3" -> 3). An unknown name or a bad value raises ``OptionError``."""
        checked = {}
        for name, value in given.items():
            if name not in self.options:
                raise OptionError(f"strategy {self.name!r} does not take option {name!r} "
                                  f"(it takes: {', '.join(self.options) or 'no options'})", name)
            try:
                checked[name] = self._types[name].validate_python(value)
            except ValidationError as exc:
                raise OptionError(f"option {name}: {exc.errors()[0]['msg']}", name) from None
        return checked

    async def __call__(self, engine: Engine, question: str, **arguments) -> Result:
        bound = self.__signature__.bind(engine, question, **arguments)
        bound.apply_defaults()
        result = await self.run(*bound.args, **bound.kwargs)
        # What the strategy recorded wins: it holds the settings it really used (a weighting's logprobs, greedy's
        # temperature) and values it computed (DeepConf's threshold).
        result.config = {**self._config(bound.arguments), **result.config}
        return result

    def _config(self, arguments: dict[str, Any]) -> dict[str, Any]:
        sampling = sampling_config(arguments.get("params", SamplingParams()))
        options = {name: arguments[name] for name in self.options if name in arguments}
        return {"n": arguments.get("n"), "seed": arguments.get("seed"), "budget": arguments.get("budget"),
                **sampling, **options}
