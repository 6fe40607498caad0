"""Benchmark problems: a JSONL file, a short name for a file of ``../shared/data``, or a reasoning-gym generator
(an optional extra, ``pip install "ponder[gym]"``: it pulls about twenty packages that no other dataset needs).

Every dataset knows how to score a prediction (``Dataset.score``) and says how in words (``Dataset.scoring``), so the
rule is written into each results file. ``Dataset.sha256`` fingerprints the problems themselves (id, question,
answer), whatever their source, so a results file can tell when the data under it changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

from ..answers import equivalent, normalize
from ..engine.base import PonderError

SHORT_NAMES = {
    "gsm8k": "gsm8k_dev.jsonl",
    "math500": "math500_dev.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
}
DATA_ENV = "PONDER_DATA"  # a directory holding the files of SHORT_NAMES
GYM_PREFIX = "gym:"
GYM_DEFAULTS = {"seed": 0, "size": 100}
MATH_VERIFY_RULE = "math-verify: ponder.answers.equivalent(prediction, ponder.answers.normalize(gold))"
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # the gold final answer
    solution: str | None = None
    level: str | None = None
    subject: str | None = None
    metadata: dict = field(default_factory=dict)  # reasoning-gym's per-problem data, which its scorer reads


@dataclass
class Dataset:
    name: str
    source: str  # where the problems came from: a file path or the reasoning-gym call
    problems: list[Problem]
    scoring: str  # the score rule in words, recorded in every results header
    scorer: Callable[[str | None, Problem], bool]

    def score(self, prediction: str | None, problem: Problem) -> bool:
        return prediction is not None and self.scorer(prediction, problem)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for p in self.problems:
            digest.update(json.dumps([p.id, p.question, p.answer], ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def select(self, *, offset: int = 0, limit: int | None = None, shuffle: bool = False,
               seed: int = 0) -> list[Problem]:
        """The problems to run: optionally shuffled with ``seed``, then ``offset`` skipped, then ``limit`` kept."""
        if offset < 0:
            raise PonderError(f"--offset must be >= 0, got {offset}")
        if limit is not None and limit < 1:
            raise PonderError(f"--limit must be >= 1, got {limit}")
        if offset >= len(self.problems):
            raise PonderError(f"--offset {offset} is past the end of {self.name} ({len(self.problems)} problems)")
        problems = list(self.problems)
        if shuffle:
            random.Random(seed).shuffle(problems)
        end = None if limit is None else offset + limit
        return problems[offset:end]


def load_dataset(spec: str) -> Dataset:
    """``spec`` is ``gym:NAME?seed=S&size=K[&param=value...]``, a short name (gsm8k, math500, aime24, amc23) or a
    path to a JSONL file."""
    if spec.startswith(GYM_PREFIX):
        return _load_gym(spec)
    if spec in SHORT_NAMES:
        return _load_jsonl(_find_short_name(spec), name=spec)
    path = Path(spec)
    if path.is_file():
        return _load_jsonl(path, name=path.stem)
    raise PonderError(f"no dataset {spec!r}: not a file, not a short name ({', '.join(SHORT_NAMES)}) "
                      f"and not {GYM_PREFIX}NAME?seed=S&size=K")


def data_dirs() -> list[tuple[str, Path | None]]:
    """Where short names are looked for, in order, each with how it was found (for the error message)."""
    env = os.environ.get(DATA_ENV)
    return [
        (f"${DATA_ENV}", Path(env) if env else None),
        ("../shared/data from the current directory", (Path.cwd() / ".." / "shared" / "data").resolve()),
        ("../shared/data from the repository root", (_REPO_ROOT / ".." / "shared" / "data").resolve()),
    ]


def _find_short_name(name: str) -> Path:
    filename = SHORT_NAMES[name]
    looked = []
    for how, directory in data_dirs():
        if directory is None:
            looked.append(f"{how} (unset)")
            continue
        candidate = directory / filename
        if candidate.is_file():
            return candidate
        looked.append(f"{candidate} ({how})")
    raise PonderError(f"dataset {name!r} not found; looked for {filename} in: {'; '.join(looked)}")


def _load_jsonl(path: Path, *, name: str) -> Dataset:
    problems: list[Problem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PonderError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise PonderError(f"{where}: expected a JSON object with id, question and answer")
            missing = [k for k in ("id", "question", "answer") if row.get(k) in (None, "")]
            if missing:
                raise PonderError(f"{where}: missing field {missing[0]!r}")
            problem_id = str(row["id"])
            if problem_id in seen:
                raise PonderError(f"{where}: duplicate id {problem_id!r}")
            seen.add(problem_id)
            problems.append(Problem(
                id=problem_id, question=str(row["question"]), answer=str(row["answer"]),
                solution=row.get("solution"),
                level=None if row.get("level") is None else str(row["level"]),
                subject=row.get("subject"),
            ))
    if not problems:
        raise PonderError(f"{path}: no problems in the file")
    return Dataset(name=name, source=str(path), problems=problems, scoring=MATH_VERIFY_RULE,
                   scorer=lambda prediction, problem: equivalent(prediction, normalize(problem.answer)))


def _load_gym(spec: str) -> Dataset:
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ModuleNotFoundError as e:
        if e.name != "reasoning_gym":  # installed, but something it imports is missing: that error says what
            raise
        raise PonderError(f"{spec!r} needs reasoning-gym, an optional extra: pip install \"ponder[gym]\"") from None

    parts = urlsplit(spec[len(GYM_PREFIX):])
    gym_name = parts.path
    if gym_name not in DATASETS:
        raise PonderError(f"unknown reasoning-gym dataset {gym_name!r} in {spec!r} "
                          f"(for example gsm_symbolic, basic_arithmetic, chain_sum, countdown)")
    params: dict = dict(GYM_DEFAULTS)
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        params[key] = _query_value(value)
    try:
        generator = reasoning_gym.create_dataset(gym_name, **params)
        entries = list(generator)
    except Exception as e:  # the generators validate their own parameters, each with its own exception type
        raise PonderError(f"reasoning-gym cannot build {spec!r}: {e}") from None
    canonical = f"{GYM_PREFIX}{gym_name}?" + "&".join(f"{k}={v}" for k, v in params.items())
    problems = [
        Problem(id=f"{gym_name}-{params['seed']}-{i}", question=entry["question"], answer=str(entry["answer"]),
                metadata=entry["metadata"])
        for i, entry in enumerate(entries)
    ]

    def score(prediction: str, problem: Problem) -> bool:
        entry = {"question": problem.question, "answer": problem.answer, "metadata": problem.metadata}
        return generator.score_answer(prediction, entry) >= 1.0  # below 1.0 is partial credit, not a solve

    return Dataset(name=canonical, source=f"reasoning_gym.create_dataset({gym_name!r}, **{params})",
                   problems=problems, scorer=score,
                   scoring=f"reasoning-gym: {gym_name}.score_answer(prediction, entry) == 1.0")


def _query_value(value: str):
    """``size=20`` is an int, ``p=0.5`` a float, ``flag=true`` a bool; anything else stays a string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
