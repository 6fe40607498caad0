"""What a sampling run's traces say about early stopping: confidence, vote spread, length. An analysis of a results
file.

    python -m benchmarks.analysis.traces benchmarks/results/gsm8k100/sc16.jsonl

Each early-stopping idea bets on a property of the traces. Weighted votes and DeepConf bet that a trace's confidence
separates right from wrong traces; Adaptive-Consistency that the vote settles after a few samples; short-m@k and
first-finish that the shortest traces are the best ones. This reads the branches of a sampling run (recorded by
``ponder bench`` with logprobs on) and prints, without generating anything:

* the AUROC of the trace signal (mean token logprob, and mean confidence when recorded) for "this branch's answer is
  right": 0.5 is no separation, 1.0 perfect;
* the accuracy of re-voting the same branches: plain majority, weighted by ``exp(mean logprob)``, and majority among
  the most confident half / tenth of the traces (DeepConf's offline filter with the mean logprob as the confidence);
* how settled the votes are: the leading answer's share of a problem's votes, over the problems;
* accuracy by length: within each problem the branches ranked from shortest to longest, and the share of right
  answers at each rank (the first rank is what first-finish answers with).

It is an analysis of traces already generated, not a benchmark run: the strategies' own accuracy and token figures
come from ``ponder bench``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from ponder.bench.runner import read_results
from ponder.engine.base import PonderError


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """P(a random right branch scores above a random wrong one), ties counted half (the Mann-Whitney U statistic)."""
    right = np.array([s for s, y in zip(scores, labels) if y])
    wrong = np.array([s for s, y in zip(scores, labels) if not y])
    if not len(right) or not len(wrong):
        return None
    above = (right[:, None] > wrong[None, :]).sum() + 0.5 * (right[:, None] == wrong[None, :]).sum()
    return float(above / (len(right) * len(wrong)))


def write_report(path: Path | None, table: dict) -> None:
    """Write an analysis's figures as JSON to ``path`` (None: nowhere), making its folder."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1) + "\n")


def summaries_main(argv: list[str] | None, *, prog: str, doc: str, what: str, summarize, show) -> int:
    """The command line the per-file analyses share (``search_stats.py``, ``specreason_stats.py``): results files in,
    ``summarize(path)`` of each, printed by ``show`` or as JSON."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help=what)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        stats = [summarize(path) for path in args.results]
    except PonderError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for s in stats:
            show(s)
    return 0


def revote(record: dict, weigh=lambda b: 1.0, keep: float = 1.0) -> bool:
    """Whether the vote of ``record``'s answering branches is right, each weighted by ``weigh(branch)``, after keeping
    the ``keep`` fraction with the highest mean logprob. A tie goes to the run's own answer when it is among the tied
    (so the plain majority reproduces the run's vote, whose ties went to the answer that finished first), else to
    the answer of the earlier branch."""
    voters = [b for b in record["branches"] if b["answer_class"] is not None and b.get("mean_logprob") is not None]
    if not voters:
        return False
    confident = sorted(voters, key=lambda b: b["mean_logprob"], reverse=True)[: math.ceil(len(voters) * keep)]
    voters = [b for b in voters if b in confident]  # back in branch order, for the ties
    totals: dict[int, float] = {}
    for b in voters:
        totals[b["answer_class"]] = totals.get(b["answer_class"], 0.0) + weigh(b)
    own = next((c for c, group in enumerate(record["answer_classes"]) if group["answer"] == record["prediction"]), None)
    winner = max(totals, key=lambda c: (totals[c], c == own))  # max keeps the first of equal keys: branch order
    return record["answer_classes"][winner]["correct"]


def leader_share(record: dict) -> float:
    """The share of a problem's branches whose answer is the most common one (0 when none answered)."""
    sizes = [group["size"] for group in record["answer_classes"]]
    return max(sizes) / len(record["branches"]) if sizes and record["branches"] else 0.0


def accuracy_by_length_rank(records: list[dict]) -> list[tuple[float, float]]:
    """(share right, mean generated tokens) of the k-th shortest branch, k = 1..N, over the problems with N branches
    (N: the most common branch count; problems with another count are left out)."""
    counts = [len(r["branches"]) for r in records if r["branches"]]
    if not counts:
        return []
    n = max(set(counts), key=counts.count)
    ranked = [sorted(r["branches"], key=lambda b: b["generated_tokens"]) for r in records if len(r["branches"]) == n]
    return [(float(np.mean([bs[k]["correct"] for bs in ranked])), float(np.mean([bs[k]["generated_tokens"]
                                                                                 for bs in ranked])))
            for k in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results file of a sampling run with logprobs")
    args = parser.parse_args()
    try:
        header, records = read_results(args.results)
    except PonderError as exc:
        sys.exit(str(exc))
    answered = [b for r in records for b in r["branches"] if b["answer_class"] is not None]
    if not any(b.get("mean_logprob") is not None for b in answered):
        sys.exit(f"{args.results}: no branch has a mean logprob (run the benchmark with a strategy that records them)")
    print(f"{args.results}: {header['strategy']} n={header['config']['n']} on {header['dataset']['name']}, "
          f"{len(records)} problems, {len(answered)} branches with an answer "
          f"({sum(b['correct'] for b in answered) / len(answered):.1%} of them right)")
    for signal in ("mean_logprob", "mean_confidence"):
        scored = [b for b in answered if b.get(signal) is not None]
        if scored:
            value = auroc([b[signal] for b in scored], [b["correct"] for b in scored])
            print(f"  AUROC of {signal} for a right answer: {value:.3f} over {len(scored)} branches")
    count = len(records)
    votes = {
        "majority": lambda r: revote(r),
        "weighted by exp(mean logprob)": lambda r: revote(r, lambda b: math.exp(b["mean_logprob"])),
        "majority of the 50 % most confident": lambda r: revote(r, keep=0.5),
        "majority of the 10 % most confident": lambda r: revote(r, keep=0.1),
    }
    print("  re-votes of the same branches (accuracy):")
    for name, right in votes.items():
        hits = sum(right(r) for r in records)
        print(f"    {name:38s} {hits / count:6.1%}  ({hits}/{count})")
    shares = sorted(leader_share(r) for r in records)
    print("  how settled the votes are (the leading answer's share of all branches; quartiles over problems): "
          + ", ".join(f"{q:.0%}" for q in np.quantile(shares, [0.25, 0.5, 0.75])))
    print(f"    problems where >= 3/4 of the branches agree: {sum(s >= 0.75 for s in shares)}/{count}; "
          f"where <= 1/4 do: {sum(s <= 0.25 for s in shares)}/{count}")
    ranks = accuracy_by_length_rank(records)
    if ranks:
        print("  accuracy by length rank (1 = the problem's shortest branch; share right, mean generated tokens):")
        for rank, (right, tokens) in enumerate(ranks, 1):
            print(f"    {rank:3d}  {right:6.1%}  {tokens:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
