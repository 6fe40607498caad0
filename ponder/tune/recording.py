"""Recording for ``ponder tune``: the arms it records (``ARMS``), each as an ordinary ``ponder bench`` run into its own
resumable results file (``arm_configs``, ``record``, ``recorded``), and the machine's measured speed
(``measure_speed``: seconds of one decode step of 1, 2 and 4 branches and of one prompt token)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from ..engine.base import Engine, PonderError, SamplingParams, Usage

# The arms a tune records: (name, kind, greedy?, the ponder bench strategy that records it).
ARMS = (("reasoning-greedy", "reasoning", True, "greedy"), ("program-greedy", "program", True, "pal"),
        ("reasoning-sampled", "reasoning", False, "sc"), ("program-sampled", "program", False, "pal"))
SPEED_WIDTHS = (1, 2, 4)


def arm_configs(*, temperature: float, max_tokens: int, reasoning_samples: int, program_samples: int, seed: int,
                logprobs: bool) -> dict:
    """The ``BenchConfig`` recording each arm (the settings of the kept GSM8K recordings with the defaults)."""
    from ..bench.runner import BenchConfig

    sampled = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=logprobs)
    configs = {}
    for name, kind, greedy, strategy in ARMS:
        n = 1 if greedy else reasoning_samples if kind == "reasoning" else program_samples
        # greedy decodes at temperature 0 whatever it is given; pal is asked for it
        params = replace(sampled, temperature=0.0) if greedy and strategy == "pal" else sampled
        configs[name] = BenchConfig(strategy, n, params, seed)
    return configs


def record(engine: Engine, dataset, problems, configs: dict, directory: Path, console: Console, *,
           concurrency: int = 1) -> dict[str, Path]:
    """Record every arm into ``directory`` (resuming what is there); returns the file of each arm."""
    from ..bench.runner import run_bench

    files = {}
    for name, config in configs.items():
        path = directory / f"{engine.model.name}-{name}.jsonl"
        files[name] = path
        if recorded(path, config, engine.model.name, problems):
            console.print(f"[bold]recorded[/] {name}: every problem is in {path}")
            continue
        console.print(f"[bold]recording[/] {name} ({config.strategy}, {config.n} branch"
                      f"{'es' if config.n > 1 else ''} per problem) into {path}")
        run_bench(engine, dataset, problems, config, path, concurrency=concurrency)
    return files


def recorded(path: Path, config, model: str | None, problems) -> bool:
    """Whether ``path`` already holds ``config``'s branches of every problem on ``model``: the same strategy, number
    of branches, temperature (greedy's aside) and token limit. (A file made by an older ponder, whose header lacks a
    newer sampling field, is still a recording of the arm; ``ponder bench`` would refuse to resume it.)"""
    from ..bench.runner import read_results

    if model is None or not path.is_file():
        return False
    try:
        header, records = read_results(path)
    except PonderError:
        return False
    params = header["config"]["params"]
    return (header["strategy"] == config.strategy and header["config"]["n"] == config.n
            and header["model"]["name"] == model and params["max_tokens"] == config.params.max_tokens
            and (config.strategy == "greedy" or params["temperature"] == config.params.temperature)
            and {p.id for p in problems} <= {r["id"] for r in records})


async def _measure(engine: Engine, steps: int) -> dict:
    from ..prompts import DEFAULT_PROMPT

    usage = Usage()
    warm = await engine.open(DEFAULT_PROMPT.messages("Say hello."), usage)
    await warm.extend(SamplingParams(temperature=0.0, max_tokens=4))
    warm.release()
    question = ("A baker sells {k} loaves on Monday and twice as many on Tuesday, then gives away a third of all the "
                "loaves he sold to a shelter and keeps the rest for the market. How many loaves go to market?")
    speed = {"step_s": {}}
    for width in SPEED_WIDTHS:
        started = time.perf_counter()
        root = await engine.open(DEFAULT_PROMPT.messages(question.format(k=17 + width)), usage)  # a new prompt
        if width == SPEED_WIDTHS[0]:
            speed["prompt_s"] = round((time.perf_counter() - started) / root.context_tokens, 6)
        branches = await root.fork(width)
        started = time.perf_counter()
        await asyncio.gather(*(b.extend(SamplingParams(temperature=0.7, max_tokens=steps, ignore_eos=True, seed=i))
                               for i, b in enumerate(branches)))
        speed["step_s"][str(width)] = round((time.perf_counter() - started) / steps, 6)
        for branch in (root, *branches):
            branch.release()
    return speed


def measure_speed(engine: Engine, steps: int = 32) -> dict:
    """Seconds of one decode step of 1, 2 and 4 branches, and of one prompt token, on the engine's model."""
    return asyncio.run(_measure(engine, steps))
