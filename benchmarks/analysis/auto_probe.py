"""The correctness probe as ``auto``'s tie-break, on the branches of a live ``auto`` run (issue 33: "in ``auto``, its
effect at equal seconds").

Where ``auto`` did not settle -- it ran to its branch cap, or a budget, with no answer ahead by the margin -- its vote
is a split one. On exactly the branches the live run decoded (so at exactly its seconds and tokens), this shows what
each rule answers there:

* ``vote``: the arm-weighted vote of the branches (ties to the first answer);
* ``probe tie-break``: ``auto``'s rule (``ponder.strategies.auto.break_tie``): the vote, except where every answer has
  one branch or answers tie for the lead, where the reasoning branch the probe rates highest decides;
* ``probe pick``: the reasoning branch the probe rates highest, always (the rule first tried, session 20);
* ``logprob tie-break``: ``auto``'s rule with the mean token log-probability instead (free: recorded with the run);
* ``greedy``: the opening greedy reasoning branch; ``any right``: whether some branch was right (the ceiling);

and, on the problems whose reasoning branches hold both right and wrong answers, how often the probe's and the
logprob's best branch is right (the issue's within-question pick accuracy).

The probe scores come from the run itself where it kept them (``auto`` with its probe tie-break records every
reasoning branch's score in ``details["tiebreak"]``); otherwise the hidden states are read as ``ponder probe train``
reads them (each branch's text appended to its prompt, the vector at its end), into the same cache::

    python -m benchmarks.analysis.auto_probe benchmarks/results/gsm8k-auto/auto.jsonl \\
        --out benchmarks/results/probe/auto-tiebreak.json

The probe must not have been trained on these problems (the shipped 1.5B probe read GSM8K dev 1-82). Programs have
no probe score: it was trained on reasoning branches.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.analysis.traces import write_report
from ponder.answers import vote
from ponder.bench.datasets import load_dataset
from ponder.bench.runner import read_results, run_prompt
from ponder.engine.base import ModelInfo
from ponder.probes import probe_for
from ponder.probes.train import DEFAULT_CACHE, HiddenCache, Sample, read_hidden
from ponder.strategies.auto import SETTLED, break_tie
from ponder.strategies.auto_profile import SHIPPED, Profile
from ponder.strategies.registry import math_chat

RULES = ("vote", "probe tie-break", "probe pick", "logprob tie-break", "greedy", "any right")


def branch_kind(branch: dict) -> str:
    return branch["details"]["kind"]  # auto's branches say their arm and kind


def branch_arm(branch: dict) -> str:
    return branch["details"]["arm"]


def unsettled(records: list[dict]) -> list[dict]:
    return [r for r in records if r["details"]["stopped"] not in SETTLED]


def voters_of(record: dict) -> list[tuple[int, dict]]:
    """(index, branch) of the branches that voted: those with an answer."""
    return [(i, b) for i, b in enumerate(record["branches"]) if b.get("answer") is not None]


def kept_scores(record: dict, tiebreak: str) -> dict[int, float] | None:
    """The probe scores the live run recorded, by branch index (each arm's scores in its branches' order), or None.
    ``tiebreak`` is the run's option: its scores are the probe's only under ``probe`` (the default, which records
    none where it fell back to the vote)."""
    listed = record["details"].get("tiebreak", {})
    if tiebreak != "probe" or "scores" not in listed:
        return None
    queue: dict[str, list[float]] = defaultdict(list)
    for entry in listed["scores"]:
        queue[entry["arm"]].append(entry["score"])
    scores = {}
    for i, b in voters_of(record):
        if branch_kind(b) == "reasoning" and queue.get(branch_arm(b)):
            scores[i] = queue[branch_arm(b)].pop(0)
    return scores


def samples_of(header: dict, records: list[dict]) -> list[Sample]:
    questions = {p.id: p.question for p in load_dataset(header["dataset"]["source"]).problems}
    prompt = run_prompt(header)
    out = []
    for record in records:
        chat = math_chat(questions[record["id"]], prompt)
        for i, b in voters_of(record):
            if branch_kind(b) == "reasoning":
                out.append(Sample(f"auto:{record['id']}:{i}", header["dataset"]["name"], record["id"], b["text"],
                                  chat, b.get("answer"), bool(b.get("correct")), b.get("mean_logprob")))
    return out


def best_is_right(branches: list[tuple[int, dict]], score) -> bool:
    """Whether the branch of (index, branch) pairs that ``score`` rates highest (the first of equals) is right."""
    return bool(branches) and max(branches, key=score)[1]["correct"]


def probe_of(scores: dict[int, float]):
    return lambda ib: scores.get(ib[0], -math.inf)


def logprob_of(ib: tuple[int, dict]) -> float:
    value = ib[1].get("mean_logprob")
    return -math.inf if value is None else value  # 0.0 is a real value: every token certain


def decide(record: dict, scores: dict[int, float], weights: dict[str, float]) -> dict[str, bool]:
    """Whether each rule answers ``record`` right; ``scores`` are the probe's, by branch index; ``weights`` each arm's
    vote weight."""
    voted = voters_of(record)
    ballot = vote([b["answer"] for _, b in voted], [weights.get(branch_arm(b), 1.0) for _, b in voted])
    position = {i: k for k, (i, _) in enumerate(voted)}  # branch index -> voter index in the ballot
    reasoning = [(i, b) for i, b in voted if branch_kind(b) == "reasoning"]

    def right(answer) -> bool:  # an answer of the ballot: right if its voters are
        return any(voted[k][1]["correct"] for k in ballot.members.get(answer, []))

    def tie_broken(by: dict[int, float]) -> bool:
        chosen = break_tie(ballot, {position[i]: s for i, s in by.items() if i in position})
        return right(ballot.winner if chosen is None else chosen)

    logprobs = {i: b["mean_logprob"] for i, b in reasoning if b.get("mean_logprob") is not None}
    return {"vote": right(ballot.winner),
            "probe tie-break": tie_broken(scores),
            "probe pick": best_is_right(reasoning, probe_of(scores)),
            "logprob tie-break": tie_broken(logprobs),
            "greedy": bool(reasoning) and reasoning[0][1]["correct"],
            "any right": any(b["correct"] for _, b in voted)}


def probe_scores(header: dict, records: list[dict], cache_dir: Path) -> dict[str, dict[int, float]]:
    """Each record's probe scores by branch index: recorded by the run, else read from the hidden states."""
    tiebreak = header["config"].get("options", {}).get("tiebreak", "probe")
    scores = {r["id"]: kept_scores(r, tiebreak) for r in records}
    to_read = [r for r in records if scores[r["id"]] is None]
    if to_read:
        model = header["model"]
        samples = samples_of(header, to_read)
        cache = HiddenCache(cache_dir, model["sha256"])
        if read_hidden(model, samples, cache, None):
            raise SystemExit("some hidden states could not be read")
        probe = probe_for(ModelInfo(model["name"], model["path"], sha256=model["sha256"]))
        for r in to_read:
            scores[r["id"]] = {}
        for s in samples:
            scores[s.problem][int(s.key.rsplit(":", 1)[1])] = float(probe.score(cache.vectors[s.key]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="an auto results file of ponder bench")
    parser.add_argument("--first", type=int, help="only the first this many problems of the file")
    parser.add_argument("--skip", type=int, default=0, help="skip this many problems of the file first")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="hidden states read so far")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    header, records = read_results(args.results)
    if header["strategy"] != "auto":
        raise SystemExit(f"{args.results} is a run of {header['strategy']}, not of auto")
    records = [r for r in records if "branches" in r][args.skip:][:args.first]
    chosen = unsettled(records)
    scores = probe_scores(header, chosen, args.cache)
    weights = {arm.name: arm.weight for arm in Profile.read(SHIPPED).arms.values()}
    by_class: dict[str, Counter] = defaultdict(Counter)
    for record in chosen:
        counts = by_class[record["details"]["stopped"]]
        counts["problems"] += 1
        for rule, ok in decide(record, scores[record["id"]], weights).items():
            counts[rule] += ok
    mixed = [r for r in chosen if len({b["correct"] for _, b in voters_of(r) if branch_kind(b) == "reasoning"}) == 2]
    picks = {"probe": 0, "logprob": 0}
    for r in mixed:
        reasoning = [(i, b) for i, b in voters_of(r) if branch_kind(b) == "reasoning"]
        picks["probe"] += best_is_right(reasoning, probe_of(scores[r["id"]]))
        picks["logprob"] += best_is_right(reasoning, logprob_of)
    table = {"results": str(args.results), "problems": len(records), "skipped": args.skip, "unsettled": len(chosen),
             "by_stop": {k: dict(v) for k, v in by_class.items()},
             "pick_where_reasoning_right_and_wrong": {"problems": len(mixed), **picks}}
    print(f"{len(chosen)} of {len(records)} problems unsettled")
    print("| stopped | problems | " + " | ".join(RULES) + " |")
    print("|---|---:|" + "---:|" * len(RULES))
    for stopped, counts in by_class.items():
        print(f"| {stopped} | {counts['problems']} | " + " | ".join(str(counts[r]) for r in RULES) + " |")
    print(f"where the reasoning branches hold right and wrong answers ({len(mixed)} problems), the best branch was "
          f"right: by the probe {picks['probe']}, by the logprob {picks['logprob']}")
    write_report(args.out, table)


if __name__ == "__main__":
    main()
