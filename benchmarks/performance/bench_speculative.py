"""Speculative decoding, measured side by side in one run: the 1.5B alone against the 1.5B with the 0.5B drafting.

1. **Greedy, one stream**, on a few GSM8K questions: are the tokens identical, and the speedup (ratio of tok/s).
   Target (issue 10): >= 1.5x with identical output.
2. **Greedy, 8 branches** of one question (all verified in one target batch per step): aggregate tok/s and how
   many branches are token-for-token the target's own.

   Identity is checked, not assumed: llama.cpp's logits depend slightly on the shape of the decode batch, and a
   verify batch (k + 1 tokens per branch) differs from plain decoding's (one), so where the target's two best tokens
   are nearly tied the pick can flip. The run prints, for every output that differs, the first differing token and
   the gap between the target's top two log-probabilities there (recorded with ``top_logprobs=2``): a gap of a few
   hundredths of a nat is such a tie; a large gap would be a bug (and is asserted against).
3. **Sampled** (temperature 0.7), one stream and 8 branches: acceptance rate and tok/s (the output distribution is
   the target's, tested in tests/engine/test_speculative_sampling.py).
4. **What bounds it**: the time of one ``llama_decode`` of B tokens for B = 1, 2, 4, 8, 16 on each model. Speculative
   decoding pays off when verifying k + 1 tokens costs little more than decoding one; the table shows how far that
   holds on this machine.

    python -m benchmarks.performance.bench_speculative [--max-tokens 128] [--questions 3]
        [--out benchmarks/results/performance/speculative.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import llama_cpp as llama

from ponder.bench.datasets import load_dataset
from ponder.engine import SamplingParams, Usage
from ponder.models import load_engine
from ponder.prompts import math_messages

TARGET, DRAFT = "qwen2.5-1.5b", "qwen2.5-0.5b"
TIE_NATS = 0.5  # a flip between tokens closer than this is batch-shape numerics; beyond it, a bug


def top2_gap(record: tuple[list[float], list[float]], i: int) -> float:
    """The gap in nats between the best and second-best token at position ``i`` of a greedy branch recorded with
    ``top_logprobs=2``: its confidence is -(lp1 + lp2) / 2 and greedy chose lp1."""
    logprobs, confidences = record
    return logprobs[i] - (-2 * confidences[i] - logprobs[i])


async def generate(engine, question: str, n: int, params: SamplingParams):
    """Wall seconds of the decode (prompt excluded), the branches' tokens, the usage, and per branch its token
    logprobs and confidences."""
    usage = Usage()
    root = await engine.open(math_messages(question), usage)
    forks = await root.fork(n)
    root.release()
    start = time.perf_counter()
    await asyncio.gather(*(b.extend(params) for b in forks))
    elapsed = time.perf_counter() - start
    tokens = [b.tokens for b in forks]
    records = [(b.token_logprobs, b.confidences) for b in forks]
    for b in forks:
        b.release()
    return elapsed, tokens, usage, records


def decode_costs(runner, sizes=(1, 2, 4, 8, 16), repeats=5) -> dict[int, float]:
    """Milliseconds of one llama_decode of B tokens of one sequence after a short prompt (best of ``repeats``), on
    an idle model of an engine (``engine._runners[name]``)."""
    prompt = runner.prompt_tokens(math_messages("What is 12 times 7?"))
    llama.llama_memory_clear(runner.context._memory, True)
    runner.context.decode([(t, i, 0, False) for i, t in enumerate(prompt)])
    costs = {}
    for size in sizes:
        times = []
        for _ in range(repeats):
            llama.llama_memory_seq_rm(runner.context._memory, 0, len(prompt), -1)
            start = time.perf_counter()
            runner.context.decode([(prompt[-1], len(prompt) + i, 0, True) for i in range(size)])
            times.append(time.perf_counter() - start)
        costs[size] = 1000 * min(times)
    llama.llama_memory_clear(runner.context._memory, True)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--questions", type=int, default=3, help="GSM8K dev questions for the single-stream runs")
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/performance/speculative.json")
    args = parser.parse_args()
    questions = [p.question for p in load_dataset("gsm8k").problems[: args.questions]]
    alone = load_engine(TARGET, n_ctx=4096, n_seq_max=16)
    drafted = load_engine(TARGET, draft=DRAFT, n_ctx=4096, n_seq_max=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=True, top_logprobs=2)
    sampled = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=0)
    print(f"{TARGET} alone vs {TARGET} + {DRAFT} draft; max_tokens {args.max_tokens}; {os.cpu_count()} threads; "
          f"{platform.processor() or platform.machine()}")
    report = {"target": TARGET, "draft": DRAFT, "max_tokens": args.max_tokens, "runs": []}

    def compare(label: str, question: str, n: int, params: SamplingParams, check_identity: bool) -> dict:
        # alone and drafted alternate on the same input, so a burst of noise hurts both
        t_alone, tok_alone, _, records = asyncio.run(generate(alone, question, n, params))
        t_spec, tok_spec, usage, _ = asyncio.run(generate(drafted, question, n, params))
        same = [a == b for a, b in zip(tok_alone, tok_spec)]
        first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                            for a, b in zip(tok_alone, tok_spec)]
        gaps = [None if i is None else round(top2_gap(records[j], i), 4)
                for j, i in enumerate(first_difference)] if check_identity else []
        assert all(g is None or g < TIE_NATS for g in gaps), f"{label}: outputs differ where the target was sure: {gaps}"
        generated_alone, generated_spec = sum(map(len, tok_alone)), sum(map(len, tok_spec))
        row = {"run": label, "n": n, "alone_s": t_alone, "speculative_s": t_spec,
               "alone_tok_s": generated_alone / t_alone, "speculative_tok_s": generated_spec / t_spec,
               "speedup": (generated_spec / t_spec) / (generated_alone / t_alone),
               "drafted": usage.drafted_tokens, "accepted": usage.accepted_tokens,
               "acceptance": usage.accepted_tokens / max(1, usage.drafted_tokens),
               "identical_branches": sum(same), "first_difference": first_difference,
               "top2_gap_at_difference": gaps}
        print(f"{label:<28} alone {row['alone_tok_s']:6.1f} tok/s | speculative {row['speculative_tok_s']:6.1f} "
              f"tok/s | speedup {row['speedup']:.2f}x | acceptance {row['acceptance']:.0%} "
              f"({usage.accepted_tokens}/{usage.drafted_tokens}) | identical {sum(same)}/{n}"
              + ("" if all(same) or params.temperature else
                 f" (first difference at token {first_difference}, top-2 gap {gaps} nats)"),
              flush=True)
        report["runs"].append(row)
        return row

    singles = [compare(f"greedy, 1 stream, q{i}", q, 1, greedy, True) for i, q in enumerate(questions)]
    compare(f"greedy, {args.branches} branches", questions[0], args.branches, greedy, True)
    compare("sampled 0.7, 1 stream", questions[0], 1, sampled, False)
    compare(f"sampled 0.7, {args.branches} branches", questions[0], args.branches, sampled, False)
    report["greedy_single_stream_speedup"] = statistics.median(r["speedup"] for r in singles)
    print(f"median greedy single-stream speedup: {report['greedy_single_stream_speedup']:.2f}x (target >= 1.5x)")

    costs = {"target": decode_costs(alone._runners[TARGET]), "draft": decode_costs(drafted._runners[DRAFT])}
    report["decode_ms_by_batch"] = costs
    print("one llama_decode of B tokens (ms):  " + "  ".join(f"B={b}" for b in costs["target"]))
    for name, row in costs.items():
        single = row[1]
        print(f"  {name:<7} " + "  ".join(f"{ms:6.1f} ({ms / single:.1f}x)" for ms in row.values()))
    alone.close()
    drafted.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
