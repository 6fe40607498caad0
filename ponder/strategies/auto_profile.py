"""What the ``auto`` strategy reads: a profile of arms, the policy that spends them, and this machine's speed.

An **arm** is one way to answer: a model, a representation (``reasoning``: a step-by-step answer; ``program``: a Python
program the sandbox runs, as in ``pal``) and a temperature (0 = greedy). A **policy** says which arms open (decoded
together in one batch), which arms are added, a wave at a time, while the vote is unsettled, and when it is settled: the
opening arms agree, or the leading answer leads the runner-up by ``margin`` votes (each branch votes with its arm's
weight), or ``max_branches`` branches have run. A profile holds one policy per effort level (``low``, ``medium``,
``high``; ``reasoning_effort`` over HTTP), the measured speed it was fitted with, and where it came from. ``ponder
tune`` writes one; the one shipped in the package (``auto_profile.json``, beside this module) was tuned for the bundled
models on GSM8K dev problems 1-100.

Which profile ``auto`` reads: its ``profile`` option (a path), else ``$PONDER_PROFILE``, else the one ``ponder tune``
wrote to ``$PONDER_HOME/profile.json`` on this machine, else the shipped one. The format is versioned
(``"ponder_profile": 1``); a profile of another version, or one that does not parse, is a one-line ``PonderError``
naming the file and what is wrong.

The policy's decisions are pure functions here (``Policy.waves``, ``Policy.stop_reason``), so that the live strategy
and ``ponder tune``'s replay of recorded branches make exactly the same ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

from ..engine.base import PonderError

PROFILE_FORMAT = 1
KINDS = ("reasoning", "program")
EFFORTS = ("low", "medium", "high")
PROFILE_ENV = "PONDER_PROFILE"
SHIPPED = Path(__file__).resolve().with_suffix(".json")
# Why a run stopped (``Result.details["stopped"]``).
STOP_REASONS = ("agreed", "margin", "max branches", "token budget", "time budget")


@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # a bundled model name or GGUF path; "" is the engine's own model
    kind: str  # one of KINDS
    temperature: float
    weight: float = 1.0  # its branches' weight in the vote
    tokens: float = 0.0  # mean generated tokens of one branch, measured (predicts a wave's seconds)

    def check(self, where: str) -> None:
        if self.kind not in KINDS:
            raise PonderError(f"{where}: arm {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.temperature <= 5.0:
            raise PonderError(f"{where}: arm {self.name!r}: temperature must be between 0 and 5")
        if not self.weight > 0:
            raise PonderError(f"{where}: arm {self.name!r}: weight must be more than 0")


@dataclass(frozen=True)
class Policy:
    open: tuple[str, ...]  # arms decoded together first, one branch each
    then: tuple[str, ...]  # the arms added while unsettled, in this cycle
    wave: int = 2  # branches per added wave (decoded together)
    margin: float = 2.0  # settled when the leader leads the runner-up by this many votes
    max_branches: int = 6

    def check(self, where: str, arms: Sequence[str]) -> None:
        if not self.open:
            raise PonderError(f"{where}: a policy needs at least one opening arm")
        unknown = [a for a in (*self.open, *self.then) if a not in arms]
        if unknown:
            raise PonderError(f"{where}: the policy names arm {unknown[0]!r}, which the profile does not define")
        if self.wave < 1 or self.max_branches < 1 or not self.margin > 0:
            raise PonderError(f"{where}: wave and max_branches must be at least 1 and margin more than 0")

    def waves(self) -> Iterator[list[str]]:
        """The arms of each wave, in order: the opening, then ``wave`` arms at a time from the ``then`` cycle, until
        ``max_branches`` branches in all (the last wave cut to fit)."""
        opening = list(self.open[:self.max_branches])
        yield opening
        started = len(opening)
        if not self.then:
            return
        cycle = 0
        while started < self.max_branches:
            k = min(self.wave, self.max_branches - started)
            yield [self.then[(cycle + i) % len(self.then)] for i in range(k)]
            cycle += k
            started += k

    def stop_reason(self, tally: Sequence[float], *, opened: bool, opening_agrees: bool) -> str | None:
        """Whether the vote so far is settled: ``tally`` is each answer's summed weight; ``opened`` says the opening
        wave has finished (before it, nothing settles); ``opening_agrees`` that every opening arm voted, for one
        answer."""
        if not opened:
            return None
        if opening_agrees and len(self.open) > 1:
            return "agreed"
        ranked = sorted(tally, reverse=True) + [0.0, 0.0]
        if ranked[0] > 0 and ranked[0] - ranked[1] >= self.margin - 1e-9:
            return "margin"
        return None


@dataclass
class Profile:
    name: str
    arms: dict[str, Arm]
    policies: dict[str, Policy]  # by effort
    # Measured on the machine it was tuned on: per model, seconds of one decode step by batch width
    # (``step_s``: {"1": ..., "2": ...}) and of one prompt token (``prompt_s``); a program's sandbox run (s).
    speed: dict[str, dict] = field(default_factory=dict)
    program_s: float = 0.1
    tuned: dict = field(default_factory=dict)  # where it came from: data, problems, figures
    source: str = "(in memory)"  # the file it was read from

    def policy(self, effort: str = "medium") -> Policy:
        if effort not in self.policies:
            raise PonderError(f"effort must be one of {', '.join(self.policies)}, got {effort!r}")
        return self.policies[effort]

    def models(self) -> list[str]:
        return list(dict.fromkeys(arm.model for arm in self.arms.values()))

    def step_s(self, model: str, width: int) -> float:
        """Seconds of one decode step of ``width`` branches on ``model`` (interpolated between measured widths)."""
        table = {int(w): s for w, s in (self.speed.get(model) or next(iter(self.speed.values()), {})).get(
            "step_s", {"1": 0.04}).items()}
        widths = sorted(table)
        if width <= widths[0]:
            return table[widths[0]] * width / widths[0] if width < widths[0] else table[widths[0]]
        for lo, hi in zip(widths, widths[1:]):
            if width <= hi:
                return table[lo] + (table[hi] - table[lo]) * (width - lo) / (hi - lo)
        top = widths[-1]
        return table[top] * width / top

    def prompt_s(self, model: str) -> float:
        return (self.speed.get(model) or next(iter(self.speed.values()), {})).get("prompt_s", 0.005)

    def to_dict(self) -> dict:
        return {"ponder_profile": PROFILE_FORMAT, "name": self.name,
                "arms": [asdict(arm) for arm in self.arms.values()],
                "policies": {effort: {**asdict(p), "open": list(p.open), "then": list(p.then)}
                             for effort, p in self.policies.items()},
                "speed": self.speed, "program_s": self.program_s, "tuned": self.tuned}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)  # a reader never sees half a profile
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "(in memory)") -> Profile:
        where = f"profile {source}"
        if not isinstance(data, dict) or "ponder_profile" not in data:
            raise PonderError(f"{where} is not a ponder profile (no \"ponder_profile\" field)")
        if data["ponder_profile"] != PROFILE_FORMAT:
            raise PonderError(f"{where} has format {data['ponder_profile']!r}; this ponder reads format "
                              f"{PROFILE_FORMAT}: rerun ponder tune to write a new one")
        try:
            arms = {a["name"]: Arm(**a) for a in data["arms"]}
            policies = {effort: Policy(**{**p, "open": tuple(p["open"]), "then": tuple(p.get("then", ()))})
                        for effort, p in data["policies"].items()}
            profile = cls(name=str(data.get("name", "")), arms=arms, policies=policies,
                          speed=dict(data.get("speed", {})), program_s=float(data.get("program_s", 0.1)),
                          tuned=dict(data.get("tuned", {})), source=source)
        except (KeyError, TypeError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise PonderError(f"{where} is malformed: {what}") from None
        for arm in arms.values():
            arm.check(where)
        missing = [e for e in EFFORTS if e not in policies]
        if missing:
            raise PonderError(f"{where} has no policy for effort {missing[0]!r} (it needs {', '.join(EFFORTS)})")
        for effort, policy in policies.items():
            policy.check(f"{where}, effort {effort}", list(arms))
        return profile

    @classmethod
    def read(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PonderError(f"no profile {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PonderError(f"profile {path} cannot be read: {e}") from None
        except json.JSONDecodeError as e:
            raise PonderError(f"profile {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls.from_dict(data, str(path))


def tuned_path() -> Path:
    """Where ``ponder tune`` writes this machine's profile, and ``auto`` looks for it."""
    from ..engine.home import ponder_home

    return ponder_home() / "profile.json"


def profile_path(given: str | None = None) -> Path:
    """The profile to read: ``given``, else ``$PONDER_PROFILE``, else this machine's tuned one, else the shipped one."""
    if given:
        return Path(given).expanduser()
    if os.environ.get(PROFILE_ENV):
        return Path(os.environ[PROFILE_ENV]).expanduser()
    tuned = tuned_path()
    return tuned if tuned.is_file() else SHIPPED


_CACHE: dict[tuple[str, float], Profile] = {}


def load_profile(given: str | None = None) -> Profile:
    """The profile ``profile_path(given)`` names, read once per file version (a server reads it per request)."""
    path = profile_path(given)
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        key = None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    profile = Profile.read(path)
    if key is not None:
        _CACHE[key] = profile
    return profile


def with_overrides(policy: Policy, **given) -> Policy:
    """``policy`` with the given fields (None: keep) replaced."""
    return replace(policy, **{k: v for k, v in given.items() if v is not None})
