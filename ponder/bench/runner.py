"""Run one strategy configuration over a dataset into a results file that survives being killed.

The results file is JSONL: a header line (strategy config with the prompt, model, dataset fingerprint, score rule,
ponder version), then one line per finished problem, appended with flush + fsync the moment the problem finishes. A
run killed at any point (kill -9 included) therefore loses only the problems in flight, plus at most one half-written
last line, which the next run cuts off before appending. Rerunning the same command skips the problems already in the
file; a run with a different configuration (another prompt included) is refused rather than mixed in.

Problem records hold: ``id``, ``gold``, ``prediction``, ``correct``, ``level``/``subject`` when the data has them,
``votes`` (the strategy's own vote), ``answer_classes`` (the answers of the branches that ended on their own, grouped
by equivalence, each with its ``size`` and ``correct``), ``branches`` (text, answer, ``answer_class``, ``correct``,
generated tokens, finish reason, mean logprob / confidence -- null unless the config's ``params`` or the strategy
asked for logprobs), ``usage``, ``wall_s`` and the ``started``/``finished`` times and ``session`` of the run that
solved it. A problem that cannot run (its prompt does not fit the context) is recorded as wrong, with ``error``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from .. import __version__
from ..answers import vote
from ..engine.base import Engine, PonderError, PromptTooLongError, SamplingParams, Usage
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import Result
from ..strategies import StrategyCall, get_strategy
from ..strategies.pool import ENDED_ON_THEIR_OWN
from .datasets import Dataset, Problem

RESULTS_FORMAT = 1  # the header's "ponder_results" field; bump when the line layout changes


@dataclass
class BenchConfig:
    """Everything that decides what a run measures; two runs may share a results file only if these are equal."""

    strategy: str
    n: int
    params: SamplingParams
    seed: int = 0
    options: dict = field(default_factory=dict)  # passed to the strategy as keyword arguments
    prompt: MathPrompt = DEFAULT_PROMPT

    def to_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "params": asdict(self.params), "options": self.options,
                "prompt": self.prompt.to_dict()}


def run_prompt(header: dict) -> MathPrompt:
    """The prompt of the run a results header describes. Files written before the header recorded the prompt were
    all run with the default one."""
    recorded = header["config"].get("prompt")
    return MathPrompt(**recorded) if recorded is not None else DEFAULT_PROMPT


def problem_seed(seed: int, problem_id: str) -> int:
    """The strategy seed of one problem: fixed by the run seed and the problem id, so a problem samples the same
    way whatever its position, the --offset/--shuffle/--concurrency used, or how many times the run was resumed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:4], "big")


def make_header(engine: Engine, dataset: Dataset, config: BenchConfig, replay: dict | None = None) -> dict:
    """The results header; ``replay`` describes the recording a replay run plays back (see ``replay.py``)."""
    header = {
        "ponder_results": RESULTS_FORMAT,
        "ponder_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "strategy": config.strategy,
        "config": config.to_dict(),
        "model": {"name": engine.model.name, "sha256": engine.model.sha256, "path": engine.model.path},
        "dataset": {"name": dataset.name, "source": dataset.source, "sha256": dataset.sha256,
                    "problems": len(dataset.problems)},
        "scoring": dataset.scoring,
    }
    if replay is not None:
        header["replay"] = replay
    return json.loads(json.dumps(header))  # the form it has once read back (tuples become lists)


def recorded_params(header: dict) -> dict:
    """The sampling parameters a results file's run used, as recorded (JSON types). Sampling fields added since the
    file was written (e.g. ``hidden``) count as their defaults: the run sampled so."""
    return {**asdict(SamplingParams()), "stop": [], **header["config"].get("params", {})}


def _identity(header: dict) -> dict:
    """The header fields that must match for a run to append to an existing results file."""
    model = header["model"]
    return {
        "strategy": header["strategy"],
        "config": {**header["config"], "params": recorded_params(header),
                   "prompt": run_prompt(header).to_dict()},  # older files: the default prompt
        "model": model["sha256"] or model["name"],  # a remote model has no file to hash
        "dataset sha256": header["dataset"]["sha256"],
        "scoring": header["scoring"],
        "replay of": _replayed(header.get("replay")),
    }


def _replayed(replay: dict | None) -> list[str] | None:
    """The hashes of the files a replay plays back (the default model's first)."""
    if replay is None:
        return None
    return [replay["sha256"]] + [other["sha256"] for other in replay.get("other_recordings", [])]


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} is {a!r} in the file, {b!r} now")
    return found


_HEADER_START = b'{"ponder_results": '  # how json.dumps begins every header line


def _scan(path: Path) -> tuple[dict | None, list[dict], int]:
    """Header, problem records and the byte length of the complete lines. A final line without its newline is a
    write cut short by a crash and is left out; a file that is nothing but such a cut-off header has no header."""
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    lines = data[:complete].splitlines()
    if not lines and (not data or data.startswith(_HEADER_START)):
        return None, [], complete
    parsed = []
    for lineno, line in enumerate(lines, 1):
        try:
            parsed.append(json.loads(line))
        except ValueError:  # bad JSON, or bytes that are not text at all
            raise PonderError(f"{path}:{lineno} is not valid JSON, so {path} is not an intact ponder results "
                              "file") from None
    header = parsed[0] if parsed else None
    if not isinstance(header, dict) or header.get("ponder_results") != RESULTS_FORMAT:
        raise PonderError(f"{path} is not a ponder results file (format {RESULTS_FORMAT}); choose another --out")
    return header, parsed[1:], complete


def read_results(path: str | Path) -> tuple[dict, list[dict]]:
    """The header and problem records of a results file, read-only (a run may still be appending to it)."""
    path = Path(path)
    if not path.is_file():
        raise PonderError(f"no results file {path}")
    header, records, _ = _scan(path)
    if header is None:
        raise PonderError(f"{path} is empty (its run died before writing the header)")
    return header, records


class ResultsFile:
    """An append-only results file, opened for one run: created with ``header``, or resumed if its header matches."""

    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        self.records: list[dict] = []
        self.created = not self.path.exists()  # by this run: a run that then fails before any result removes it
        old_header = None
        if self.path.is_dir():
            raise PonderError(f"{self.path} is a directory; --out needs a file path")
        if self.path.exists():
            old_header, self.records, complete = _scan(self.path)
            if complete < self.path.stat().st_size:
                os.truncate(self.path, complete)
            if old_header is not None:
                problems = _differences(_identity(old_header), _identity(header))
                if problems:
                    raise PonderError(f"{self.path} holds results of a different run ({'; '.join(problems)}): "
                                      "use another --out, or delete the file to start over")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.header = old_header or header
        self.resumed = len(self.records)  # problems already in the file when it was opened
        self._file = open(self.path, "ab")
        if old_header is None:
            self._write(header)

    @property
    def finished(self) -> set[str]:
        return {r["id"] for r in self.records}

    def append(self, record: dict) -> None:
        self._write(record)
        self.records.append(record)

    def _write(self, line: dict) -> None:
        # One write of one whole line, forced to disk: after a kill the file ends with complete lines, or with a
        # cut-off last line that the next ResultsFile truncates.
        self._file.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def run_bench(engine: Engine, dataset: Dataset, problems: Sequence[Problem], config: BenchConfig,
              out: str | Path, *, concurrency: int = 1, progress: bool = True, replay: dict | None = None,
              clock: Callable[[], float] = time.time) -> ResultsFile:
    """Solve every problem of ``problems`` not yet in ``out`` with ``concurrency`` problems in flight on ``engine``
    (their branches share its decode batches), appending each record as it finishes. Returns the results file.

    A replay (``engine`` a ``ReplayEngine``) passes its description as ``replay`` and its virtual ``clock``, which
    times the records."""
    if concurrency < 1:
        raise PonderError(f"--concurrency must be >= 1, got {concurrency}")
    config = check_config(config)
    results = ResultsFile(out, make_header(engine, dataset, config, replay))
    try:
        finished = results.finished
        todo = [p for p in problems if p.id not in finished]
        session = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

        async def solve(problem: Problem) -> dict:
            return await _solve(engine, dataset, problem, config, session, clock)

        selected = {p.id for p in problems}
        done_here = [r for r in results.records if r["id"] in selected]
        with _BenchProgress(engine, total=len(problems), done=done_here, enabled=progress) as bar:
            try:
                asyncio.run(_run_all(todo, solve, results.append, bar, concurrency))
            except ExceptionGroup as group:  # the first failure stopped the run; report it, not the group
                raise group.exceptions[0] from None
    except BaseException:
        results.close()
        if results.created and not results.records:  # a file this run made and put no result in: nothing to resume
            results.path.unlink(missing_ok=True)
        raise
    results.close()
    return results


def check_config(config: BenchConfig) -> BenchConfig:
    """``config`` with its strategy options checked and typed; a bad name or value is a one-line error."""
    if config.n < 1:
        raise PonderError(f"--n must be >= 1, got {config.n}")
    return replace(config, options=get_strategy(config.strategy).check_options(config.options))


async def _run_all(todo: list[Problem], solve, save: Callable[[dict], None], bar: _BenchProgress,
                   concurrency: int) -> None:
    pending = iter(todo)

    async def worker() -> None:
        for problem in pending:  # one shared iterator: a worker takes the next problem as soon as it is free
            record = await solve(problem)
            save(record)
            bar.advance(record)

    async with asyncio.TaskGroup() as group:
        workers = [group.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
        if bar.enabled:
            group.create_task(bar.tick_until_done(workers))


async def _solve(engine: Engine, dataset: Dataset, problem: Problem, config: BenchConfig, session: str,
                 clock: Callable[[], float]) -> dict:
    started = clock()
    call = StrategyCall(config.strategy, problem.question, n=config.n, params=config.params,
                        seed=problem_seed(config.seed, problem.id), prompt=config.prompt, options=config.options)
    try:
        result: Result = await call(engine)
    except PromptTooLongError as e:
        return _record(problem, started, clock(), session, prediction=None, correct=False, error=str(e),
                       branches=[], usage=Usage().to_dict())
    # Group answers the way the strategies vote: a branch cut short (halted, cancelled) abstains.
    classes = vote([b.answer if b.finish_reason in ENDED_ON_THEIR_OWN else None for b in result.branches])
    representatives = list(classes.groups)
    class_correct = [dataset.score(rep, problem) for rep in representatives]
    class_of = {i: c for c, rep in enumerate(representatives) for i in classes.members[rep]}
    branches = []
    for i, summary in enumerate(result.branches):
        answer_class = class_of.get(i)
        branches.append({**summary.to_dict(), "answer_class": answer_class,
                         "correct": answer_class is not None and class_correct[answer_class]})
    return _record(
        problem, started, clock(), session, prediction=result.answer, correct=dataset.score(result.answer, problem),
        votes=result.to_dict()["votes"],
        answer_classes=[{"answer": rep, "size": len(classes.members[rep]), "correct": ok}
                        for rep, ok in zip(representatives, class_correct)],
        branches=branches, usage=result.usage.to_dict(),
        **({"details": result.details} if result.details else {}),
    )


def _record(problem: Problem, started: float, finished: float, session: str, **fields) -> dict:
    record = {"id": problem.id, "gold": problem.answer}
    record.update({k: v for k, v in (("level", problem.level), ("subject", problem.subject)) if v is not None})
    record.update(fields)
    record.update(wall_s=round(finished - started, 3), started=round(started, 3), finished=round(finished, 3),
                  session=session)
    return record


class _BenchProgress:
    """A rich progress bar with running accuracy, generated tokens/s and ETA. When stderr is not a terminal (a run
    under nohup, in CI, piped to a log), one plain line per finished problem instead."""

    TICK_S = 0.5  # how often tokens/s is refreshed from the engine's counters while problems are in flight

    def __init__(self, engine: Engine, *, total: int, done: list[dict], enabled: bool):
        console = Console(stderr=True)
        self.enabled = enabled and console.is_terminal
        self._log_lines = enabled and not console.is_terminal
        self._engine = engine
        self._total = total
        self._correct = sum(bool(r["correct"]) for r in done)
        self._finished = self._finished_before = len(done)
        self._start_tokens = engine.stats().generated_tokens
        self._start = time.perf_counter()
        self._bar = Progress(
            TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(),
            TextColumn("acc {task.fields[accuracy]}"), TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not self.enabled,
        )
        self._task = self._bar.add_task("bench", total=total, completed=len(done), accuracy=self._accuracy(),
                                        speed="-")

    def _accuracy(self) -> str:
        return f"{self._correct / self._finished:.1%}" if self._finished else "-"

    def _speed(self) -> float:
        generated = self._engine.stats().generated_tokens - self._start_tokens
        return generated / max(time.perf_counter() - self._start, 1e-9)

    def advance(self, record: dict) -> None:
        self._finished += 1
        self._correct += bool(record["correct"])
        self._bar.update(self._task, advance=1, accuracy=self._accuracy())
        if self._log_lines:
            elapsed = time.perf_counter() - self._start
            eta = elapsed / (self._finished - self._finished_before) * (self._total - self._finished)
            print(f"bench {self._finished}/{self._total}  {record['id']} {'right' if record['correct'] else 'wrong'}"
                  f"  acc {self._accuracy()}  {self._speed():.0f} tok/s  elapsed {_clock(elapsed)}  ETA {_clock(eta)}",
                  file=sys.stderr, flush=True)

    async def tick_until_done(self, workers: list[asyncio.Task]) -> None:
        while not all(w.done() for w in workers):
            self._bar.update(self._task, speed=f"{self._speed():.0f}")
            await asyncio.sleep(self.TICK_S)

    def __enter__(self) -> _BenchProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
