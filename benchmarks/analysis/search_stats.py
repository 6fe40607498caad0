"""How well a step search's scores rank right above wrong: the figures issue 11 asks for when a search misses.

    python -m benchmarks.analysis.search_stats benchmarks/results/math100/particles4.jsonl [MORE.jsonl ...]

Reads the search trees that ``ponder bench`` keeps for ``beam``, ``dvts``, ``particles`` and ``astar`` (each
problem's ``details["tree"]``) and prints, per results file:

* accuracy, and how often *some* finished solution in the tree was right (the most the pick could reach);
* what two other picks over the tree's finished solutions would have scored: a majority vote and a value-weighted
  vote (each finished node once; ties go to the answer reached first);
* tokens per problem as each model spent them: the generator's sampled tokens, and the judge's -- the steps it read
  (prompt tokens not taken from a cache) plus its scoring tokens. ``total`` adds all of them, the figure to hold
  against SC's tokens;
* the AUROC of the scores for "right": of the finished solutions' values (does the pick's ranking separate right
  from wrong?), and of every scored step (is the step on a path to a right answer?). A scored node is labelled by
  the finished solutions below it (itself included): right if one of them is right, wrong if all are wrong; nodes
  with no finished solution below are left out. 0.5 is no separation, 1.0 perfect.

It reads what a run recorded; it generates nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ponder.answers import equivalent, normalize, vote
from ponder.bench.runner import read_results
from benchmarks.analysis.traces import auroc, summaries_main


def labelled_nodes(problem: dict) -> tuple[list[tuple[dict, bool]], list[tuple[dict, bool]], bool]:
    """(node, right) of every finished solution with a value, (node, on a right path) of every scored step with a
    finished solution below it (itself included), and whether any finished solution was right."""
    nodes = problem["details"]["tree"]["nodes"]
    gold = normalize(problem["gold"])
    children: dict[int | None, list[dict]] = {}
    for node in nodes:
        children.setdefault(node["parent"], []).append(node)
    right = {node["id"]: equivalent(node["answer"], gold) for node in nodes if node["status"] == "finished"}

    below: dict[int, list[bool]] = {}  # the right/wrong of the finished solutions in each node's subtree

    def collect(node: dict) -> list[bool]:
        found = [right[node["id"]]] if node["id"] in right else []
        for child in children.get(node["id"], []):
            found += collect(child)
        below[node["id"]] = found
        return found

    for root in children.get(None, []):
        collect(root)
    finals = [(node, right[node["id"]]) for node in nodes if node["id"] in right and node["value"] is not None]
    steps = [(node, any(below[node["id"]])) for node in nodes if node["score"] is not None and below.get(node["id"])]
    return finals, steps, any(right.values())


def problem_labels(problem: dict) -> tuple[list[tuple[float, bool]], list[tuple[float, bool]], bool]:
    """(value, right) of every finished solution, (score, on a right path) of every scored step, and whether any
    finished solution was right."""
    finals, steps, any_right = labelled_nodes(problem)
    return ([(node["value"], ok) for node, ok in finals], [(node["score"], ok) for node, ok in steps], any_right)


def vote_picks(problem: dict) -> tuple[bool, bool]:
    """Whether a majority vote, and a value-weighted vote, of the tree's finished solutions pick a right answer."""
    finished = [node for node in problem["details"]["tree"]["nodes"] if node["status"] == "finished"]
    gold = normalize(problem["gold"])
    answers = [node["answer"] for node in finished]
    by_majority = vote(answers).winner
    by_value = vote(answers, [node["value"] or 0.0 for node in finished]).winner
    return equivalent(by_majority, gold), equivalent(by_value, gold)


def per_problem_tokens(problem: dict, generator: str) -> dict[str, float]:
    """The generator's sampled tokens and the other models' (the judge's) evaluated and scoring tokens."""
    models = problem["usage"].get("models", {})
    sampled = models.get(generator, {}).get("generated_tokens", problem["usage"]["generated_tokens"])
    judge = sum(m.get("prompt_tokens", 0) + m.get("scored_tokens", 0) + m.get("generated_tokens", 0)
                for name, m in models.items() if name != generator)
    if not models:  # one model: it scores its own steps
        judge = problem["usage"].get("scored_tokens", 0)
    return {"generated": sampled, "judge": judge, "total": sampled + judge}


def summarize(path: Path) -> dict:
    header, problems = read_results(path)  # a run may still be appending to it
    problems = [p for p in problems if "tree" in (p.get("details") or {})]
    if not problems:
        raise SystemExit(f"{path}: no search trees in this file (run beam, dvts, particles or astar)")
    finals, steps, reachable, majority, weighted = [], [], 0, 0, 0
    tokens = {"generated": 0.0, "judge": 0.0, "total": 0.0}
    for problem in problems:
        f, s, any_right = problem_labels(problem)
        finals += f
        steps += s
        reachable += any_right
        by_majority, by_value = vote_picks(problem)
        majority += by_majority
        weighted += by_value
        for kind, n in per_problem_tokens(problem, header["model"]["name"]).items():
            tokens[kind] += n / len(problems)
    return {
        "file": str(path), "strategy": header["strategy"], "config": header.get("config", {}),
        "problems": len(problems),
        "accuracy": sum(p["correct"] for p in problems) / len(problems),
        "some_solution_right": reachable / len(problems),
        "majority_vote": majority / len(problems),
        "weighted_vote": weighted / len(problems),
        "tokens_per_problem": {k: round(v, 1) for k, v in tokens.items()},
        "auroc_final": auroc([v for v, _ in finals], [r for _, r in finals]),
        "finals": len(finals),
        "auroc_steps": auroc([v for v, _ in steps], [r for _, r in steps]),
        "steps": len(steps),
    }


def show(stats: dict) -> None:
    def fmt(x):
        return "n/a (one class only)" if x is None else f"{x:.3f}"
    t = stats["tokens_per_problem"]
    print(f"{stats['file']}: {stats['strategy']} over {stats['problems']} problems")
    print(f"  accuracy {stats['accuracy']:.1%}; some finished solution right {stats['some_solution_right']:.1%}")
    print(f"  other picks of the finished solutions: majority vote {stats['majority_vote']:.1%}, value-weighted "
          f"vote {stats['weighted_vote']:.1%}")
    print(f"  tokens per problem: generated {t['generated']:.0f}, judge {t['judge']:.0f}, total {t['total']:.0f}")
    print(f"  AUROC of final values {fmt(stats['auroc_final'])} over {stats['finals']} solutions; "
          f"of step scores {fmt(stats['auroc_steps'])} over {stats['steps']} steps")


def main(argv: list[str] | None = None) -> int:
    return summaries_main(argv, prog=f"python -m {__spec__.name}", doc=__doc__, summarize=summarize, show=show,
                          what="ponder bench results of a search strategy")


if __name__ == "__main__":
    sys.exit(main())
