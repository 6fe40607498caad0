"""Step AUROC of the correctness probe on a recorded search's trees (issue 33: "step scoring: step AUROC").

A step search (``beam``, ``dvts``, ``particles``, ``astar``) keeps its tree: every partial solution's step text, its
parent and the score its scorer gave it. This rebuilds each tree on the engine -- the prompt once, then each node
forked from its parent with its step appended, level by level (so every token is evaluated once) -- and reads the
final hidden state at the end of each step, which is what ``--option scorer=hidden`` scores live. It then prints the
AUROC of the probe's scores and of the recorded scores, on the same steps and labels as ``search_stats``: a step is
right when some finished solution below it is right; steps with no finished solution below are left out. Finished
solutions get the same two AUROCs.

    python -m benchmarks.analysis.step_probe benchmarks/results/math100/beam4-logprob.jsonl \\
        --out benchmarks/results/probe/step-auroc-math500-0.5b.json

The vectors are cached (``benchmarks/results/probe/hidden-steps``, outside git: some 14 MB for 100 trees of the
0.5B), so a rerun reads nothing again. The probe must not have been trained on these problems.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from pathlib import Path

import numpy as np

from benchmarks.analysis.search_stats import labelled_nodes
from benchmarks.analysis.traces import auroc, write_report
from ponder.bench.datasets import load_dataset
from ponder.bench.runner import read_results, run_prompt
from ponder.engine.base import ModelInfo
from ponder.models import load_engine
from ponder.probes import probe_for
from ponder.probes.train import HiddenCache
from ponder.strategies.registry import math_chat

STEP_CACHE = Path("benchmarks/results/probe/hidden-steps")


async def read_tree(engine, chat, nodes: list[dict]) -> dict[int, np.ndarray]:
    """The final hidden state at the end of every non-root node's path, by node id."""
    root = await engine.open(chat)
    held = {}
    vectors = {}
    try:
        by_depth: dict[int, list[dict]] = {}
        for node in nodes:
            by_depth.setdefault(node["depth"], []).append(node)
        for depth in sorted(by_depth):
            level = by_depth[depth]
            if depth == 0:
                held.update({node["id"]: root for node in level})
                continue

            async def one(node):
                (branch,) = await held[node["parent"]].fork(1)
                held[node["id"]] = branch
                await branch.append(node["step"])
                vectors[node["id"]] = np.array(await branch.hidden(), dtype=np.float32)

            await asyncio.gather(*(one(node) for node in level))
            for node in by_depth.get(depth - 1, []):  # the parents' cells are in their children's now
                if held[node["id"]] is not root:
                    held.pop(node["id"]).release()
    finally:
        for branch in {id(b): b for b in (root, *held.values())}.values():
            branch.release()
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a search's results file of ponder bench (trees kept)")
    parser.add_argument("--problems", type=int, help="the first this many problems (default all)")
    parser.add_argument("--max-minutes", type=float, help="stop reading after this long and report on the trees read")
    parser.add_argument("--cache", type=Path, default=STEP_CACHE, help=f"hidden states read so far (default "
                                                                     f"{STEP_CACHE}, not kept in git: 14 MB a run)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    header, records = read_results(args.results)
    records = [r for r in records if "details" in r and "tree" in r["details"]][:args.problems]
    if not records:
        raise SystemExit(f"{args.results} keeps no search trees: give a run of beam, dvts, particles or astar")
    model = header["model"]
    questions = {p.id: p.question for p in load_dataset(header["dataset"]["source"]).problems}
    prompt = run_prompt(header)
    tag = hashlib.sha256(args.results.read_bytes()).hexdigest()[:12]
    cache = HiddenCache(args.cache, model["sha256"])
    key = lambda record, node: f"step:{tag}:{record['id']}:{node['id']}"  # noqa: E731
    todo = [r for r in records if any(key(r, n) not in cache.vectors for n in r["details"]["tree"]["nodes"]
                                      if n["parent"] is not None)]
    if todo:
        engine = load_engine(model["name"], seed=0)
        start, fed = time.perf_counter(), engine.stats().prefill_tokens
        try:
            for i, record in enumerate(todo, 1):
                if args.max_minutes and time.perf_counter() - start > args.max_minutes * 60:
                    break
                nodes = record["details"]["tree"]["nodes"]
                vectors = asyncio.run(read_tree(engine, math_chat(questions[record["id"]], prompt), nodes))
                cache.vectors.update({key(record, {"id": nid}): v for nid, v in vectors.items()})
                cache.save()
                took = time.perf_counter() - start
                tokens = engine.stats().prefill_tokens - fed
                print(f"  read {i}/{len(todo)} trees, {tokens} tokens in {took:.0f} s ({tokens / took:.0f} tok/s)",
                      flush=True)
        finally:
            engine.close()
    records = [r for r in records if all(key(r, n) in cache.vectors  # the trees read so far
                                         for n in r["details"]["tree"]["nodes"] if n["parent"] is not None)]
    probe = probe_for(ModelInfo(model["name"], model["path"], sha256=model["sha256"]))
    labelled = {"finished": [], "steps": []}  # (probe score, recorded score, right), as search_stats labels them
    for record in records:
        finals, steps, _ = labelled_nodes(record)
        for name, nodes, recorded in (("finished", finals, "value"), ("steps", steps, "score")):
            labelled[name] += [(float(probe.score(cache.vectors[key(record, node)])), node[recorded], ok)
                               for node, ok in nodes]
    scorer = header["config"]["options"].get("scorer", "?")
    table = {"results": str(args.results), "problems": len(records), "recorded_scorer": scorer,
             "probe": probe.trained.get("command", "")}
    for name in ("steps", "finished"):
        probed, recorded, right = zip(*labelled[name]) if labelled[name] else ((), (), ())
        t = table[name] = {"n": len(right), "right": int(sum(right)), "auroc_probe": auroc(probed, right),
                           "auroc_recorded": auroc(recorded, right)}
        shown = {k: "n/a" if t[k] is None else f"{t[k]:.3f}" for k in ("auroc_probe", "auroc_recorded")}
        print(f"{name}: {t['n']} ({t['right']} right): AUROC probe {shown['auroc_probe']}, "
              f"recorded {scorer} {shown['auroc_recorded']}")
    write_report(args.out, table)


if __name__ == "__main__":
    main()
