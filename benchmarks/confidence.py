"""Does the model's own confidence tell its right answers from its wrong ones? An analysis of a results file.

    python benchmarks/confidence.py benchmarks/results/gsm8k100/sc16.jsonl

Weighted votes and DeepConf only pay off when a trace's confidence separates right from wrong traces. This reads the
branches of a sampling run (recorded by ``ponder bench`` with logprobs on) and prints, without generating anything:

* the AUROC of the trace signal (mean token logprob, and mean confidence when recorded) for "this branch's answer is
  right": 0.5 is no separation, 1.0 perfect;
* the accuracy of re-voting the same branches: plain majority, weighted by ``exp(mean logprob)``, and majority among
  the most confident half / tenth of the traces (DeepConf's offline filter with the mean logprob as the confidence).

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


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """P(a random right branch scores above a random wrong one), ties counted half (the Mann-Whitney U statistic)."""
    right = np.array([s for s, y in zip(scores, labels) if y])
    wrong = np.array([s for s, y in zip(scores, labels) if not y])
    if not len(right) or not len(wrong):
        return None
    above = (right[:, None] > wrong[None, :]).sum() + 0.5 * (right[:, None] == wrong[None, :]).sum()
    return float(above / (len(right) * len(wrong)))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results file of a sampling run with logprobs")
    args = parser.parse_args()
    try:
        lines = args.results.read_text().splitlines()
        header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    except (OSError, IndexError, json.JSONDecodeError) as exc:
        sys.exit(f"{args.results}: not a readable ponder results file ({exc})")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
