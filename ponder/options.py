"""Command-line options shared by ``ponder ask``, ``ponder bench`` and ``ponder serve``: one definition each."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .engine.base import Engine, PonderError, SamplingParams
from .engine.chat_templates import CHAT_TEMPLATES
from .engine.prefix_cache import PREFIX_CACHE_TOKENS
from .models import CATALOG, DEFAULT_MODEL, ENGINES, load_engine
from .prompts import INSTRUCTION, MathPrompt


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help=f"bundled model ({', '.join(CATALOG)}; default {DEFAULT_MODEL}), one re-encoded from it on "
                            "first use for faster CPU decoding (NAME-q4_0, NAME-q8_0; see `ponder models`), or the path "
                            "of a GGUF file; with --engine openai, the served model's name")
    group.add_argument("--draft", metavar="MODEL", default=None,
                       help="speculative decoding: a smaller model with the same vocabulary drafts tokens that --model "
                            "verifies in one batch (e.g. --model qwen2.5-1.5b --draft qwen2.5-0.5b); the output has "
                            "exactly the distribution of --model alone. In-process engine only")
    group.add_argument("--engine", choices=ENGINES, default="llamacpp",
                       help="llamacpp: in-process, batched (default); openai: a remote OpenAI-compatible server")
    group.add_argument("--base-url", action="append", metavar="URL",
                       help="with --engine openai: the server's base URL, e.g. http://127.0.0.1:8080/v1 "
                            "(repeat for several servers)")
    group.add_argument("--chat-template", metavar="NAME|PATH", default=None,
                       help="with --engine openai: how chats become the prompt text sent to /v1/completions: "
                            f"{' or '.join(CHAT_TEMPLATES)} (default qwen2.5), or a Jinja file (a Hugging Face "
                            "chat template); the in-process engine reads the template from the GGUF")
    group.add_argument("--prefix-cache-tokens", type=non_negative_int, default=None, metavar="N",
                       help="in-process engine: keep the KV of finished requests' prompts, up to N tokens, so a "
                            "prompt that repeats a cached prefix (a system prompt, few-shot examples, a chat's earlier "
                            f"turns) evaluates only the rest; kept in memory outside the model's context (about "
                            f"12 KB a token for the 0.5B); 0 = off (default: {PREFIX_CACHE_TOKENS})")
    group.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="in-process engine: llama.cpp threads (default: one per core). On a machine where other "
                            "programs keep cores busy, give one thread per core that is free: llama.cpp's threads wait "
                            "for each other after every operation, so one that loses its core slows all of them "
                            "(docs/findings/engine-speed.md, threads)")


def engine_from_args(args: argparse.Namespace) -> Engine:
    """The engine the model arguments ask for."""
    options = {"draft": args.draft} if args.draft else {}
    if args.chat_template is not None:
        if args.engine != "openai":
            raise PonderError("--chat-template is for --engine openai; the in-process engine uses the GGUF's own "
                              "template")
        options["chat_template"] = args.chat_template
    if args.prefix_cache_tokens is not None:
        if args.engine != "llamacpp":
            raise PonderError("--prefix-cache-tokens is for the in-process engine; a remote server keeps its own "
                              "prefix cache (vLLM: --enable-prefix-caching)")
        options["prefix_cache_tokens"] = args.prefix_cache_tokens
    if args.threads is not None:
        if args.engine != "llamacpp":
            raise PonderError("--threads is for the in-process engine; a remote server sets its own")
        options["n_threads"] = args.threads
    return load_engine(args.model, engine=args.engine, base_url=args.base_url, **options)


def add_sampling_arguments(parser: argparse.ArgumentParser, *, n_default: int, max_tokens_default: int,
                           strategy_default: str = "sc") -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--strategy", default=strategy_default,
                       help=f"strategy name (default: {strategy_default}; see `ponder strategies`)")
    group.add_argument("--n", type=positive_int, default=n_default,
                       help=f"branches (samples) per question (default: {n_default})")
    group.add_argument("--temperature", type=float, default=SamplingParams.temperature,
                       help=f"sampling temperature, 0 = greedy (default: {SamplingParams.temperature})")
    group.add_argument("--top-p", type=float, default=SamplingParams.top_p,
                       help=f"nucleus sampling mass (default: {SamplingParams.top_p})")
    group.add_argument("--top-k", type=int, default=SamplingParams.top_k,
                       help=f"sample among the k most likely tokens, 0 = off (default: {SamplingParams.top_k})")
    group.add_argument("--max-tokens", type=positive_int, default=max_tokens_default,
                       help=f"tokens per branch at most (default: {max_tokens_default})")
    group.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a strategy-specific option (repeatable), e.g. --option threshold=0.9")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompt")
    group.add_argument("--system", metavar="TEXT", default=None,
                       help="a system message before the question (default: none, so the model's chat template puts "
                            "its own default one)")
    group.add_argument("--prompt-template", metavar="FILE", type=Path, default=None,
                       help="a text file holding the user turn, with {question} where the question goes (default: "
                            f'the question, a line break, then "{INSTRUCTION}"). pal writes its own program prompt '
                            "and does not take one; mix uses it for its reasoning branches only")


def prompt_from_args(args: argparse.Namespace) -> MathPrompt:
    """The prompt the prompt arguments ask for; a missing file or one without ``{question}`` is a ``PonderError``."""
    if args.prompt_template is None:
        return MathPrompt(args.system)
    return MathPrompt.from_file(args.prompt_template, args.system)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from parsed arguments; ValueError names a bad value."""
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens).validate()


def strategy_options(pairs: list[str]) -> dict:
    """``["k=3", "mode=online"]`` -> ``{"k": 3, "mode": "online"}``; values are read as JSON when they parse. The
    strategy checks and converts them (``Strategy.check_options``), as it does options from any other caller."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options
