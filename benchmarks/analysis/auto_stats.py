"""What ``auto`` did on a results file: why it stopped, how often the opening pair agreed and was then right, each
arm's accuracy and tokens, the cost per problem, and what a tie-break (``--option tiebreak=...``) changed against the
vote of the same branches -- the figures that explain a hit or a miss.

    python -m benchmarks.analysis.auto_stats benchmarks/results/gsm8k-auto/auto.jsonl [--sc SC_RESULTS.jsonl]

With ``--sc``, an sc run's maj@k curve at auto's tokens computed per problem (prompt evaluated plus everything after
it, as ``ponder report`` plots them), interpolated between its k, on the problems both runs hold.

The opening's reasoning branch is greedy at temperature 0 on the standard math prompt: it is the model's greedy
answer on the same problem (decoded in a batch of two, so not always bit-identical to a lone greedy run: llama.cpp's
logits shift slightly with the batch), and the table reports its accuracy as such.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict

from ponder.answers import Vote
from ponder.bench.metrics import wilson_interval
from ponder.bench.runner import read_results


def vote_was_right(record: dict) -> bool:
    """Whether the run's vote (``votes``: each answer's arm-weighted total; ties to the first) was right, whatever
    answered (a tie-break may have)."""
    winner = Vote(groups=dict(record["votes"])).winner
    return winner is not None and any(c["correct"] for c in record["answer_classes"] if c["answer"] == winner)


def tiebroken(record: dict) -> bool:
    """Whether a tie-break, not the vote, answered the run."""
    return record["details"].get("tiebreak", {}).get("by", "vote") != "vote"


def main(path: str, sc: str | None = None) -> None:
    header, records = read_results(path)
    n = len(records)
    right = sum(r["correct"] for r in records)
    low, high = wilson_interval(right, n)
    print(f"{path}: {n} problems, {header['model']['name']}, profile "
          f"{records[0].get('details', {}).get('profile', {}).get('name')!r}")
    print(f"auto: {right / n:.1%} [{low:.1%}, {high:.1%}], {statistics.fmean(r['wall_s'] for r in records):.1f} s and "
          f"{statistics.fmean(r['usage']['generated_tokens'] for r in records):.0f} generated tokens per problem "
          f"(median {statistics.median(r['wall_s'] for r in records):.1f} s, max {max(r['wall_s'] for r in records):.1f} s)")
    stopped = Counter(r["details"]["stopped"] for r in records)
    print("stopped: " + ", ".join(f"{k} {v} ({v / n:.0%})" for k, v in stopped.most_common()))
    for reason in stopped:
        subset = [r for r in records if r["details"]["stopped"] == reason]
        print(f"  {reason}: right {sum(r['correct'] for r in subset) / len(subset):.0%}, "
              f"{statistics.fmean(r['wall_s'] for r in subset):.1f} s, "
              f"{statistics.fmean(len(r['branches']) for r in subset):.1f} branches")
    arms: dict[str, list[dict]] = defaultdict(list)
    first: dict[str, list[dict]] = defaultdict(list)  # each arm's first branch of each problem
    for r in records:
        seen = set()
        for b in r["branches"]:
            arm = b["details"]["arm"]
            arms[arm].append(b)
            if arm not in seen:
                first[arm].append(b)
                seen.add(arm)
    print("arm                branches  right (of its branches)  no vote  mean tokens")
    for arm, branches in arms.items():
        voted = [b for b in branches if b["finish_reason"] in ("stop", "length")]
        print(f"{arm:18s} {len(branches):8d}  {sum(b['correct'] for b in voted) / max(len(voted), 1):22.1%}  "
              f"{sum(b['answer'] is None for b in voted):7d}  {statistics.fmean(b['generated_tokens'] for b in branches):11.0f}")
    for arm in ("reasoning-greedy", "program-greedy"):
        if len(first[arm]) == n:
            ok = sum(b["correct"] for b in first[arm])
            lo, hi = wilson_interval(ok, n)
            print(f"{arm} alone on these problems: {ok / n:.1%} [{lo:.1%}, {hi:.1%}]")
    both = [(r, first["reasoning-greedy"][i], first["program-greedy"][i]) for i, r in enumerate(records)
            if i < len(first["reasoning-greedy"]) and i < len(first["program-greedy"])]
    agreed = [r for r in records if r["details"]["stopped"] == "agreed"]
    if agreed:
        print(f"the opening pair agreed on {len(agreed) / n:.0%} of problems and was then right "
              f"{sum(r['correct'] for r in agreed) / len(agreed):.0%}; escalated {1 - len(agreed) / n:.0%}")
    if both:
        either = sum(rg["correct"] or pg["correct"] for _, rg, pg in both)
        print(f"either greedy arm right: {either / len(both):.0%} (a perfect pick between the two)")
    broken = [r for r in records if tiebroken(r)]
    if broken:
        voted = [vote_was_right(r) for r in broken]
        won = sum(r["correct"] and not v for r, v in zip(broken, voted))
        lost = sum(v and not r["correct"] for r, v in zip(broken, voted))
        print(f"the {broken[0]['details']['tiebreak']['by']} tie-break answered {len(broken)} unsettled problems: "
              f"right {sum(r['correct'] for r in broken)}, where the arm-weighted vote of the same branches was right "
              f"{sum(voted)} ({won} gained, {lost} lost); all problems by the vote: "
              f"{(right - won + lost) / n:.1%}")
    if sc:
        from ponder.bench.report import curve_tokens, load_runs
        from ponder.engine.base import PonderError

        try:  # as ``ponder report --common-problems`` measures them: each run on the problems both finished
            runs, _ = load_runs([path, sc], common=True)
        except PonderError as e:
            raise SystemExit(f"{sc}: {e}")
        if len(runs) < 2:
            raise SystemExit(f"{sc}: no finished problems yet")
        auto_run, sc_run = runs
        m = sc_run.metrics
        if m.maj_at_k is None:
            raise SystemExit(f"{sc}: no maj@k curve (its branches are not independent samples of one N)")
        common = auto_run.records
        tokens = auto_run.metrics.computed_tokens
        by_vote = sum(vote_was_right(r) if tiebroken(r) else r["correct"] for r in common)
        curve = [(curve_tokens(m, k), acc) for k, acc in enumerate(m.maj_at_k, start=1)]
        print(f"{sc}, on the {len(common)} problems both ran: maj@k " + ", ".join(
            f"{k}: {acc:.1%} at {t:.0f}" for k, (t, acc) in enumerate(curve, start=1)) + " tokens computed")
        print(f"  auto there: {sum(r['correct'] for r in common) / len(common):.1%} (by the vote "
              f"{by_vote / len(common):.1%}) at {tokens:.0f} tokens computed; {sc_run.header['strategy']}'s maj@k at those tokens: "
              f"{interpolate(curve, tokens):.1%}")


def interpolate(curve: list[tuple[float, float]], x: float) -> float:
    """The curve's y at x, linear between its points; beyond its ends, the end's y (a curve is not extrapolated)."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="ponder bench results of an auto run")
    parser.add_argument("--sc", help="an sc run's results, for its maj@k curve at auto's tokens computed")
    args = parser.parse_args()
    main(args.results, args.sc)
