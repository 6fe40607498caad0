"""What reading hidden states costs (issue 33), measured side by side in one run on one engine.

1. **Decoding with and without ``hidden=True``**: N branches of one GSM8K question extend a fixed number of tokens
   (``ignore_eos``), alternating rounds without and with the flag, the same seeds each round. With the flag every
   decode step runs with llama.cpp's embeddings on and the engine copies each branch's final hidden state. Printed:
   seconds per 1,000 generated tokens each way and their ratio (target: <= 1.05).
2. **Reading a recorded branch's hidden state** (what ``ponder probe train`` does): the prompt is evaluated once,
   each recorded text is appended to a fork (a prefill) and its end read (one more token): tokens per second of that
   prefill, against the same run's decode speed.

    python -m benchmarks.performance.bench_hidden [--model qwen2.5-0.5b] [--n 16] [--tokens 96] [--rounds 3]
                                      [--out benchmarks/results/performance/hidden-cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

from ponder.bench.datasets import load_dataset
from ponder.engine import SamplingParams, Usage
from ponder.models import load_engine
from ponder.prompts import math_messages


async def decode(engine, question: str, n: int, tokens: int, hidden: bool) -> tuple[float, int]:
    usage = Usage()
    root = await engine.open(math_messages(question), usage)
    forks = await root.fork(n)
    root.release()
    params = SamplingParams(temperature=0.7, max_tokens=tokens, ignore_eos=True, hidden=hidden)
    start = time.perf_counter()
    await asyncio.gather(*(b.extend(replace(params, seed=i)) for i, b in enumerate(forks)))
    elapsed = time.perf_counter() - start
    if hidden:
        assert all(b.hidden_state is not None for b in forks)
    for b in forks:
        b.release()
    return elapsed, usage.generated_tokens


async def read(engine, question: str, texts: list[str]) -> tuple[float, int]:
    """Prefill of recorded texts after one prompt, then each end's hidden state: seconds and tokens evaluated."""
    usage = Usage()
    start = time.perf_counter()
    root = await engine.open(math_messages(question), usage)
    forks = await root.fork(len(texts))
    root.release()

    async def one(branch, text):
        await branch.append(text)
        await branch.hidden()
        branch.release()

    await asyncio.gather(*(one(b, t) for b, t in zip(forks, texts)))
    return time.perf_counter() - start, usage.prompt_tokens - usage.prompt_tokens_cached + usage.scored_tokens


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/performance/hidden-cost.json"))
    args = ap.parse_args()
    problems = load_dataset("gsm8k").problems
    engine = load_engine(args.model, seed=0, prefix_cache_tokens=0)
    try:
        asyncio.run(decode(engine, problems[0].question, args.n, 16, False))  # warm-up
        plain, hidden = [], []
        for r in range(args.rounds):
            for flag, into in ((False, plain), (True, hidden)) if r % 2 == 0 else ((True, hidden), (False, plain)):
                seconds, generated = asyncio.run(decode(engine, problems[r].question, args.n, args.tokens, flag))
                into.append(1000 * seconds / generated)
        texts = [p.solution or p.answer for p in problems[10:10 + args.n]]
        read_s, read_tokens = asyncio.run(read(engine, problems[5].question, texts))
    finally:
        engine.close()
    p, h = statistics.median(plain), statistics.median(hidden)
    decode_tok_s = 1000 / p
    out = {"model": args.model, "n": args.n, "tokens": args.tokens, "rounds": args.rounds,
           "s_per_1k_plain": [round(x, 3) for x in plain], "s_per_1k_hidden": [round(x, 3) for x in hidden],
           "median_plain": round(p, 3), "median_hidden": round(h, 3), "ratio": round(h / p, 4),
           "read_tokens": read_tokens, "read_s": round(read_s, 3), "read_tok_s": round(read_tokens / read_s, 1),
           "decode_tok_s": round(decode_tok_s, 1), "machine": platform.node()}
    print(f"{args.model}, {args.n} branches x {args.tokens} tokens, {args.rounds} rounds each, alternating:")
    print(f"  decode, s per 1,000 tokens: plain {p:.2f}, hidden=True {h:.2f}: ratio {h / p:.3f}")
    print(f"  reading recorded texts: {read_tokens} tokens in {read_s:.2f} s = {read_tokens / read_s:.0f} tok/s "
          f"(decoding here: {decode_tok_s:.0f} tok/s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.model] = out
    args.out.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
