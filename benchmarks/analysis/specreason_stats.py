"""What a ``specreason`` run's judge did: the figures issue 10 asks for when SpecReason misses.

    python -m benchmarks.analysis.specreason_stats benchmarks/results/gsm8k-dev/specreason-t0.jsonl [MORE.jsonl ...]

Reads the steps ``ponder bench`` keeps for ``specreason`` (each problem's ``details["steps"]``: the large model's
0-9 score of every step the small model drafted, and whether it was accepted) and prints, per results file:

* accuracy, the acceptance rate, and the step scores' quantiles;
* the share of steps each threshold would accept (to choose ``threshold`` on dev problems: a run at threshold 0
  accepts every draft and records every score);
* the AUROC of a problem's lowest, mean and last step score for a right final answer (0.5 is no separation);
* tokens per problem as each model spent them (generated, scored, and prompt tokens it evaluated itself).

It reads what a run recorded; it generates nothing.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np

from ponder.bench.runner import read_results
from ponder.strategies import specreason
from benchmarks.analysis.traces import auroc, summaries_main

THRESHOLDS = (5.5, 6.0, 6.2, 6.4, 6.6, 7.0)
AGGREGATES = {"lowest": min, "mean": lambda s: float(np.mean(s)), "last": lambda s: s[-1]}
TOKEN_KINDS = ("generated_tokens", "scored_tokens", "prompt_tokens")
DEFAULT_THRESHOLD = inspect.signature(specreason.run).parameters["threshold"].default


def summarize(path: Path) -> dict:
    header, problems = read_results(path)  # a run may still be appending to it
    if header.get("strategy") != "specreason":
        raise SystemExit(f"{path}: not a specreason run (strategy {header.get('strategy')!r})")
    if not problems:
        raise SystemExit(f"{path}: no finished problems yet")
    scores = [s["score"] for p in problems for s in p["details"]["steps"]]
    judged = [p for p in problems if p["details"]["steps"]]  # a draft that finishes at once is never judged
    models = sorted({name for p in problems for name in p["usage"].get("models", {})})
    return {
        "file": str(path), "problems": len(problems),
        "threshold": header.get("config", {}).get("options", {}).get("threshold", DEFAULT_THRESHOLD),
        "accuracy": sum(p["correct"] for p in problems) / len(problems),
        "steps": len(scores),
        "accepted": sum(s["accepted"] for p in problems for s in p["details"]["steps"]) / max(len(scores), 1),
        "score_quantiles": dict(zip(("10", "25", "50", "75", "90"),
                                    np.quantile(scores, [.1, .25, .5, .75, .9]).round(3).tolist()))
        if scores else {},
        "would_accept": {str(t): sum(s >= t for s in scores) / len(scores) for t in THRESHOLDS} if scores else {},
        "auroc": {name: auroc([agg([s["score"] for s in p["details"]["steps"]]) for p in judged],
                              [p["correct"] for p in judged]) for name, agg in AGGREGATES.items()},
        "tokens_per_problem": {m: {k: round(sum(p["usage"]["models"].get(m, {}).get(k, 0) for p in problems)
                                            / len(problems), 1) for k in TOKEN_KINDS} for m in models},
        "wall_s_per_problem": sum(p["usage"]["wall_s"] for p in problems) / len(problems),
    }


def show(stats: dict) -> None:
    def fmt(x):
        return "n/a (one class only)" if x is None else f"{x:.3f}"
    print(f"{stats['file']}: threshold {stats['threshold']}, {stats['problems']} problems, "
          f"accuracy {stats['accuracy']:.1%}")
    print(f"  {stats['steps']} judged steps, {stats['accepted']:.0%} accepted; score quantiles (10/25/50/75/90 %): "
          + " / ".join(f"{v:.2f}" for v in stats["score_quantiles"].values()))
    print("  a threshold of " + ", ".join(f"{t} accepts {share:.0%}" for t, share in stats["would_accept"].items()))
    print("  AUROC for a right answer, of the problem's " + ", ".join(f"{name} step score {fmt(a)}"
                                                                      for name, a in stats["auroc"].items()))
    for model, tokens in stats["tokens_per_problem"].items():
        print(f"  {model} per problem: " + ", ".join(f"{n:.0f} {k.replace('_tokens', '')}" for k, n in tokens.items()))
    print(f"  wall s per problem (as each problem saw it): {stats['wall_s_per_problem']:.1f}")


def main(argv: list[str] | None = None) -> int:
    return summaries_main(argv, prog=f"python -m {__spec__.name}", doc=__doc__, summarize=summarize, show=show,
                          what="ponder bench results of specreason runs")


if __name__ == "__main__":
    sys.exit(main())
