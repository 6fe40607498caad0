"""The correctness probe as ``auto``'s tie-breaker, replayed on a live ``auto`` results file (issue 33: "in ``auto``,
its effect at equal seconds").

Where ``auto`` did not settle -- it ran to its branch cap, or a budget, with no answer ahead by the margin -- the vote
it answers with is a split one. This replays, on exactly the branches the live run decoded (so at exactly its seconds
and tokens), what other rules would have answered there:

* ``vote``: what ``auto`` answered (each branch with its arm's weight);
* ``probe``: the reasoning branch that the model's shipped correctness probe rates most likely right (programs have no
  probe: it was trained on reasoning branches);
* ``probe-vote``: the vote with each reasoning branch weighted by its probe score (programs keep their arm weight);
* ``logprob``: the reasoning branch with the highest mean token log-probability (free: recorded with the run);
* ``greedy``: the opening greedy reasoning branch; ``any right``: whether some branch was right (the ceiling);

and, on the problems whose reasoning branches hold both right and wrong answers, how often each pick is right (the
issue's within-question pick accuracy).

The hidden states are read as ``ponder probe train`` reads them (each branch's text appended to its prompt, the
vector at its end), into the same cache, so a rerun costs nothing::

    python -m benchmarks.analysis.auto_probe benchmarks/results/gsm8k-auto/auto.jsonl \\
        --out benchmarks/results/probe/auto-tiebreak.json

The probe must not have been trained on these problems (the shipped 1.5B probe read GSM8K dev 1-82).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ponder.bench.datasets import load_dataset
from ponder.bench.runner import read_results, run_prompt
from ponder.engine.base import ModelInfo
from ponder.probes import probe_for
from ponder.probes.train import DEFAULT_CACHE, HiddenCache, Sample, read_hidden
from ponder.strategies.registry import math_chat

RULES = ("vote", "probe", "probe-vote", "logprob", "greedy", "any right")


def branch_kind(branch: dict) -> str:
    details = branch.get("details") or {}
    if isinstance(details, dict):
        return details.get("kind", "reasoning")
    return "program" if "'kind': 'program'" in details else "reasoning"  # older files kept details as text


def unsettled(records: list[dict]) -> list[dict]:
    return [r for r in records if isinstance(r.get("details"), dict) and r["details"].get("stopped") != "agreed"
            and r["details"].get("stopped") != "margin"]


def samples_of(header: dict, records: list[dict]) -> list[Sample]:
    questions = {p.id: p.question for p in load_dataset(header["dataset"]["source"]).problems}
    prompt = run_prompt(header)
    out = []
    for record in records:
        chat = math_chat(questions[record["id"]], prompt)
        for i, b in enumerate(record["branches"]):
            if branch_kind(b) == "reasoning" and b.get("finish_reason") in ("stop", "length"):
                out.append(Sample(f"auto:{record['id']}:{i}", header["dataset"]["name"], record["id"], b["text"],
                                  chat, b.get("answer"), bool(b.get("correct")), b.get("mean_logprob")))
    return out


def weight_of(branch: dict) -> float:
    return 1.25 if branch_kind(branch) == "program" else 1.0  # the shipped profile's arm weights


def decide(record: dict, scores: dict[int, float]) -> dict[str, bool]:
    """Whether each rule answers ``record`` right; ``scores`` are the probe's, by branch index."""
    branches = record["branches"]
    voted = [(i, b) for i, b in enumerate(branches) if b.get("answer") is not None]
    reasoning = [(i, b) for i, b in voted if branch_kind(b) == "reasoning"]

    def right(answer) -> bool:
        return any(b["correct"] for _, b in voted if b["answer"] == answer)

    def best(key) -> bool:
        return bool(reasoning) and max(reasoning, key=key)[1]["correct"]

    tally = Counter()
    for i, b in voted:
        tally[b["answer"]] += scores.get(i, 0.5) if branch_kind(b) == "reasoning" else weight_of(b)
    return {"vote": bool(record["correct"]),
            "probe": best(lambda ib: scores.get(ib[0], 0.0)),
            "probe-vote": bool(tally) and right(max(tally, key=tally.get)),
            "logprob": best(lambda ib: ib[1].get("mean_logprob") or -math.inf),
            "greedy": bool(reasoning) and reasoning[0][1]["correct"],
            "any right": any(b["correct"] for _, b in voted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="an auto results file of ponder bench")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="hidden states read so far")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    header, records = read_results(args.results)
    records = [r for r in records if "branches" in r]
    model = header["model"]
    chosen = unsettled(records)
    samples = samples_of(header, chosen)
    cache = HiddenCache(args.cache, model["sha256"])
    missing = read_hidden(model, samples, cache, None)
    if missing:
        raise SystemExit(f"{missing} hidden states could not be read")
    probe = probe_for(ModelInfo(model["name"], model["path"], sha256=model["sha256"]))
    scores: dict[str, dict[int, float]] = defaultdict(dict)
    for s in samples:
        scores[s.problem][int(s.key.rsplit(":", 1)[1])] = float(probe.score(cache.vectors[s.key]))
    by_class: dict[str, Counter] = defaultdict(Counter)
    for record in chosen:
        stopped = record["details"]["stopped"]
        by_class[stopped]["problems"] += 1
        for rule, ok in decide(record, scores[record["id"]]).items():
            by_class[stopped][rule] += ok
    mixed = [r for r in chosen if len({b["correct"] for b in r["branches"] if branch_kind(b) == "reasoning"
                                        and b.get("answer") is not None}) == 2]
    picks = {rule: sum(decide(r, scores[r["id"]])[rule] for r in mixed) for rule in ("probe", "logprob", "greedy")}
    labels = np.array([s.correct for s in samples])
    table = {"results": str(args.results), "problems": len(records), "unsettled": len(chosen),
             "reasoning_branches": len(samples), "right": int(labels.sum()),
             "probe": probe.trained.get("command", ""), "by_stop": {k: dict(v) for k, v in by_class.items()},
             "pick_where_reasoning_right_and_wrong": {"problems": len(mixed), **picks}}
    print(f"{len(chosen)} of {len(records)} problems unsettled; {len(samples)} reasoning branches read "
          f"({int(labels.sum())} right)")
    print("| stopped | problems | " + " | ".join(RULES) + " |")
    print("|---|---:|" + "---:|" * len(RULES))
    for stopped, counts in by_class.items():
        print(f"| {stopped} | {counts['problems']} | " + " | ".join(str(counts[r]) for r in RULES) + " |")
    print(f"where the reasoning branches hold right and wrong answers ({len(mixed)} problems), the pick was right: "
          + ", ".join(f"{rule} {k}" for rule, k in picks.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
