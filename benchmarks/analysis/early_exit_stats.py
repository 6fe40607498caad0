"""What early exit did in a run, against the same run without it: the figures issue 15 asks for.

    python -m benchmarks.analysis.early_exit_stats BASE.jsonl [PROBED.jsonl]

BASE alone: how much any answer probe could save on its traces (the headroom). Both files are ``ponder bench``
results of one strategy and seed, PROBED with ``--option early_exit=...``. With one seed, each branch of the probed
run writes a prefix of one branch of the base run (on the in-process engine, up to the numerics of another batch
shape; results list branches in finishing order, so they are paired by their longest common text, at least
``PAIRED_CHARS`` characters). Each exited branch is then compared with its own full trace: how
many tokens the exit saved, and whether the probed answer is the answer the full trace reached. Only problems
present in both files count.

The headroom: a probe that stops a branch only once its answer is computed can save at most the text that follows
the first place the trace states its final answer. Its share of all answered traces' text bounds what any probe rule
(window, spacing, convergence test) saves on this model and data, before the probes' own cost.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from ponder.answers import NUMBER, equivalent, normalize
from ponder.bench.runner import read_results
from ponder.engine.base import PonderError


PAIRED_CHARS = 100  # a shorter common start may be the shared opening words of two different traces


def common_chars(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def full_trace(branch: dict, candidates: list[dict]) -> dict | None:
    """The base run's branch that ``branch`` is a prefix of (the longest common start), if it is long enough."""
    best = max(candidates, key=lambda c: common_chars(branch["text"], c["text"]), default=None)
    return best if best is not None and common_chars(branch["text"], best["text"]) >= PAIRED_CHARS else None


def first_statement_end(text: str, answer: str) -> int | None:
    """Where the trace first states ``answer`` (as an equivalent number, else verbatim): the end offset, if anywhere."""
    for match in re.finditer(NUMBER, text):
        number = normalize(match.group())
        if number is not None and equivalent(number, answer):
            return match.end()
    at = text.find(answer)
    return at + len(answer) if at >= 0 else None


def headroom(rows: dict[str, dict]) -> tuple[float, int, int]:
    """The share of answered traces' text after their answer's first statement; (share, stating, answered)."""
    after, total, stating, answered = 0, 0, 0, 0
    for row in rows.values():
        for branch in row["branches"]:
            if branch.get("answer") is None or not branch.get("text"):
                continue
            answered += 1
            end = first_statement_end(branch["text"], branch["answer"])
            total += len(branch["text"])
            if end is not None:
                stating += 1
                after += len(branch["text"]) - end
    return (after / total if total else 0.0), stating, answered


def load(path: Path) -> dict[str, dict]:
    _, rows = read_results(path)  # a run may still be appending to it
    return {row["id"]: row for row in rows if "branches" in row}


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("probed", type=Path, nargs="?")
    args = parser.parse_args()
    try:
        base = load(args.base)
        probed = load(args.probed) if args.probed else None
    except PonderError as exc:
        parser.error(str(exc))
    if not base:
        parser.error(f"{args.base}: no finished problem")
    share, stating, answered = headroom(base)
    print(f"headroom in {args.base.name} ({len(base)} problems): {share:.0%} of the answered traces' text follows "
          f"the first statement of their answer ({stating} of {answered} answered branches state it)")
    if probed is None:
        return 0
    common = [i for i in base if i in probed]
    if not common:
        parser.error("the two files have no problem in common")
    n = len(common)

    def per_problem(rows: dict[str, dict], key: str) -> float:
        return sum(rows[i]["usage"].get(key, 0) for i in common) / n

    accuracy = {name: sum(bool(rows[i]["correct"]) for i in common) / n for name, rows in
                (("base", base), ("probed", probed))}
    base_generated = per_problem(base, "generated_tokens")
    generated, probe = per_problem(probed, "generated_tokens"), per_problem(probed, "probe_tokens")
    spent = generated + probe

    exits: dict[str, int] = {}
    saved, early_right, early_same, probes_per_branch, empty, hesitant, total_probes = [], [], [], [], 0, 0, 0
    branches = 0
    for i in common:
        gold = normalize(probed[i]["gold"])
        for branch in probed[i]["branches"]:
            branches += 1
            details = (branch.get("details") or {}).get("early_exit") or {}
            found = details.get("probes", [])
            probes_per_branch.append(len(found))
            total_probes += len(found)
            empty += sum(p["answer"] is None for p in found)
            hesitant += sum(bool(p["hesitant"]) for p in found)
            rule = details.get("exit")
            if rule is None:
                continue
            exits[rule] = exits.get(rule, 0) + 1
            if rule == "loop":
                continue
            full = full_trace(branch, base[i]["branches"])
            early_right.append(branch.get("answer") is not None and equivalent(branch["answer"], gold))
            if full is not None:
                saved.append(full["generated_tokens"] - branch["generated_tokens"])
                early_same.append(branch.get("answer") is not None and full.get("answer") is not None
                                  and equivalent(branch["answer"], full["answer"]))

    print(f"{n} problems in both runs")
    print(f"accuracy: base {accuracy['base']:.1%}, probed {accuracy['probed']:.1%} "
          f"({(accuracy['probed'] - accuracy['base']) * 100:+.1f} points)")
    print(f"tokens per problem: base generated {base_generated:.0f}; probed generated {generated:.0f} + probe "
          f"{probe:.0f} = {spent:.0f} ({spent / base_generated - 1:+.1%} against base)")
    print(f"branches: {branches}; ended by " + (", ".join(f"{rule} {count} ({count / branches:.0%})"
                                                     for rule, count in exits.items()) or "no rule"))
    print(f"probes: {total_probes} ({statistics.mean(probes_per_branch):.1f} per branch), "
          f"{empty / max(total_probes, 1):.0%} without an answer, {hesitant / max(total_probes, 1):.0%} hesitant")
    if early_right:
        print(f"probe exits: answer correct {sum(early_right) / len(early_right):.0%}; same answer as the branch's "
              f"full trace {sum(early_same) / max(len(early_same), 1):.0%} ({len(early_same)} compared); tokens saved "
              f"per exit: median {statistics.median(saved):.0f}, mean {statistics.mean(saved):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
