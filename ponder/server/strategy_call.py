"""From a chat-completion request to one strategy run (a ``StrategyCall``): which strategy, how many branches, which
options.

The rules (documented for users in docs/server.md):

* Strategy: ``ponder.strategy``, or the model-name prefix (``adaptive/qwen2.5-0.5b``, ``sc-16/qwen2.5-0.5b``), or the
  server's default. Two sources that disagree are a 400.
* ``n`` is the number of branches the strategy runs (for ``sc``: the samples it votes on). It comes from
  ``ponder.n``, the model-name suffix (``sc-16``) or the top-level ``n`` (when above 1, since clients often send the
  OpenAI default ``n: 1``); two sources that disagree are a 400. The response always holds exactly one choice: the
  strategy's decision.
* The question is the one user message; earlier conversation turns are refused, because a strategy answers one
  question. The strategy writes its own user turn around the question (``ponder.prompts``); the client's system
  message (system and developer messages, joined by blank lines when there are several) becomes that prompt's system
  message, in place of the model's default one.
* ``reasoning_effort`` (OpenAI's ``low``/``medium``/``high``; ``minimal`` counts as ``low``) sets the ``effort``
  option of a strategy that takes one (``auto``: which of its profile's policies, so how much it may spend); other
  strategies ignore it. With ``ponder.effort`` too, the two must agree.
* Any other key of ``ponder`` is an option of the strategy, accepted only if the strategy's ``run`` takes a keyword of
  that name, and validated against its type annotation.
* A question longer than ``ServerConfig.max_prompt_chars`` characters (system message included) is refused here,
  before any tokenization.
"""

from __future__ import annotations

import re
from typing import Any

from ..engine.base import PonderError, SamplingParams
from ..prompts import MathPrompt
from ..strategies import STRATEGIES, OptionError, StrategyCall, get_strategy
from .config import ServerConfig
from .schemas import MAX_N, ApiError, ChatCompletionRequest, ChatMessage


def plan_call(request: ChatCompletionRequest, served_model: str, config: ServerConfig) -> StrategyCall:
    """Resolve ``request`` into a strategy call; every problem is an ``ApiError`` naming the field."""
    named_strategy, named_n = parse_model_name(request.model, served_model)
    ponder = request.ponder
    strategy = _agree("strategy", {"ponder.strategy": ponder and ponder.strategy, "model": named_strategy})
    strategy = strategy or config.default_strategy
    try:
        declared = get_strategy(strategy)
    except PonderError as exc:
        raise ApiError(400, str(exc), param="ponder.strategy", code="unknown_strategy") from None
    n = _agree("n", {"ponder.n": ponder and ponder.n, "model": named_n,
                     "n": request.n if request.n and request.n > 1 else None})
    extra = dict(ponder.model_extra or {}) if ponder else {}
    if ponder and ponder.budget is not None:
        extra["budget"] = ponder.budget
    if request.reasoning_effort is not None and "effort" in declared.options:
        effort = "low" if request.reasoning_effort == "minimal" else request.reasoning_effort
        extra["effort"] = _agree("effort", {"ponder.effort": extra.get("effort"), "reasoning_effort": effort})
    system = system_of(request.messages)
    question = question_of(request.messages, config.max_prompt_chars, system)
    try:
        return StrategyCall(declared, question, n=n or config.default_n, params=sampling_params(request),
                            seed=request.seed, prompt=MathPrompt(system), options=extra)
    except OptionError as exc:  # an unknown name or a bad value is a 400 naming it
        raise ApiError(400, f"ponder.{exc}" if str(exc).startswith("option ") else str(exc),
                       param=f"ponder.{exc.option}") from None


def parse_model_name(requested: str, served: str) -> tuple[str | None, int | None]:
    """``served`` -> (None, None); ``STRATEGY/served`` -> (strategy, None); ``STRATEGY-N/served`` -> (strategy, N)."""
    if requested == served:
        return None, None
    prefix, slash, rest = requested.partition("/")
    if not slash or rest != served:
        raise ApiError(404, f"model {requested!r} is not served here; use {served!r}, or put a strategy in front: "
                            f"'sc/{served}', 'sc-16/{served}'", param="model", code="model_not_found")
    if prefix in STRATEGIES:
        return prefix, None
    match = re.fullmatch(r"(.+)-(\d+)", prefix)
    if match is None or match.group(1) not in STRATEGIES:
        raise ApiError(400, f"unknown strategy {prefix!r} in the model name; choose one of: "
                            f"{', '.join(sorted(STRATEGIES))} (optionally with -N, e.g. sc-16)",
                       param="model", code="unknown_strategy")
    n = int(match.group(2))
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n in the model name must be between 1 and {MAX_N}, got {n}", param="model")
    return match.group(1), n


def _agree(what: str, sources: dict[str, Any]):
    given = {source: value for source, value in sources.items() if value is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{source}={value!r}" for source, value in given.items())
        raise ApiError(400, f"conflicting {what}: {listed}; give it once", param=next(iter(given)))
    return next(iter(given.values()), None)


SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role


def system_of(messages: list[ChatMessage]) -> str | None:
    """The client's system message: its system and developer messages in order, joined by blank lines; None when it
    sent none (the model's default system message applies)."""
    system = [m.text for m in messages if m.role in SYSTEM_ROLES]
    return "\n\n".join(system) if system else None


def question_of(messages: list[ChatMessage], max_chars: int | None = None, system: str | None = None) -> str:
    """The one user message; ``max_chars`` bounds it together with the ``system`` message that goes with it."""
    conversation = [m for m in messages if m.role not in SYSTEM_ROLES]
    if len(conversation) != 1 or conversation[0].role != "user":
        raise ApiError(400, "ponder answers one question per request: send exactly one user message (and system "
                            "messages, if any; earlier turns are not supported)", param="messages")
    question = conversation[0].text.strip()
    if not question:
        raise ApiError(400, "the user message is empty", param="messages")
    size = len(question) + len(system or "")
    if max_chars is not None and size > max_chars:
        what = "the system and user messages have" if system else "the user message has"
        raise ApiError(400, f"{what} {size} characters; this server accepts at most {max_chars}",
                       param="messages", code="context_length_exceeded")
    return question


def sampling_params(request: ChatCompletionRequest) -> SamplingParams:
    defaults = SamplingParams()
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    params = SamplingParams(
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        max_tokens=request.max_completion_tokens or request.max_tokens or defaults.max_tokens,
        stop=stop,
    )
    try:
        return params.validate()
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
