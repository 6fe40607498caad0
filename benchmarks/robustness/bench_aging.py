"""Does ponder's in-process engine decode slower after it has served a while? A fresh engine against an aged one.

    python -m benchmarks.robustness.bench_aging
    python -m benchmarks.robustness.bench_aging --requests 60 --out benchmarks/results/robustness/aging.json

``bench_kv.py`` showed that llama.cpp attends up to the highest used cell of its unified KV cache, so cells held high
up (by a long-lived sequence, or a cached prompt) slow every later decode down, however few cells are live. Whether
that happens to ponder's engine depends on where llama.cpp places the cells of the requests it serves. This measures
it on the engine itself, with the default options (prefix cache on):

* **measure**: one request opens a GSM8K question, forks ``--n`` branches and extends each by ``--tokens`` tokens
  (``ignore_eos``, so every run decodes the same number of tokens); aggregate generated tok/s;
* **age**: ``--requests`` requests, ``--concurrency`` at a time, each a different prompt of 200 to 2,000 tokens
  (GSM8K questions strung together) that forks 1 to 8 branches extending 16 to 128 tokens: what serving varied
  clients leaves behind (released branches, cached prompts).

Order, in one run: engine A fresh -> measure; engine A aged -> measure; the same with its prefix cache cleared ->
measure; engine B fresh (made after A is closed) -> measure, so drift of the machine shows as a difference between
the two fresh figures. Printed: the four rates and aged / fresh (target: within 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from ponder.engine import SamplingParams, Usage
from ponder.models import load_engine

ROOT = Path(__file__).resolve().parents[2]  # the repository

DATA = ROOT.parent / "shared" / "data" / "gsm8k_dev.jsonl"


def questions() -> list[str]:
    with open(DATA) as f:
        return [json.loads(line)["question"] for line in f]


async def measure(engine, question: str, n: int, tokens: int) -> float:
    """Aggregate generated tok/s of ``n`` branches of one prompt, each extending exactly ``tokens`` tokens."""
    usage = Usage()
    root = await engine.open([{"role": "user", "content": question}], usage)
    try:
        branches = await root.fork(n)
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, seed=0)
        started = time.perf_counter()
        await asyncio.gather(*(b.extend(params) for b in branches))
        elapsed = time.perf_counter() - started
        for b in branches:
            b.release()
    finally:
        root.release()
    return n * tokens / elapsed


async def age(engine, pool: list[str], requests: int, concurrency: int, rng: random.Random) -> dict:
    """Serve ``requests`` varied requests, ``concurrency`` at a time; return what they cost."""
    gate = asyncio.Semaphore(concurrency)
    usage = Usage()

    async def one(index: int) -> None:
        async with gate:
            text, parts, length = "", [], rng.randint(800, 8000)  # about 4 characters a token: 200 to 2,000 tokens
            while len(text) < length:
                parts.append(rng.choice(pool))
                text = "\n\n".join(parts)
            root = await engine.open([{"role": "user", "content": f"Request {index}.\n\n{text}"}], usage)
            try:
                branches = await root.fork(rng.randint(1, 8))
                await asyncio.gather(*(b.extend(SamplingParams(max_tokens=rng.randint(16, 128), ignore_eos=True))
                                       for b in branches))
                for b in branches:
                    b.release()
            finally:
                root.release()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return {"seconds": round(time.perf_counter() - started, 1), "prompt_tokens": usage.prompt_tokens,
            "prompt_tokens_cached": usage.prompt_tokens_cached, "generated_tokens": usage.generated_tokens}


async def main_async(args: argparse.Namespace) -> dict:
    pool = questions()
    probe_question = pool[0]
    rng = random.Random(args.seed)

    first = load_engine(args.model)
    try:
        fresh = await measure(first, probe_question, args.n, args.tokens)
        print(f"fresh engine: {fresh:.1f} tok/s", flush=True)
        aging = await age(first, pool[1:], args.requests, args.concurrency, rng)
        print(f"aged by {args.requests} requests in {aging['seconds']} s ({aging['prompt_tokens']} prompt tokens, "
              f"{aging['prompt_tokens_cached']} cached, {aging['generated_tokens']} generated); "
              f"KV cells held by live branches now: {first.stats().kv_cells_used}", flush=True)
        aged = await measure(first, probe_question, args.n, args.tokens)
        print(f"aged engine: {aged:.1f} tok/s (prefix cache: {first.prefix_cache_tokens()} tokens)", flush=True)
        first.clear_prefix_cache()
        cleared = await measure(first, probe_question, args.n, args.tokens)
        print(f"aged engine, prefix cache cleared: {cleared:.1f} tok/s", flush=True)
    finally:
        first.close()
    second = load_engine(args.model)
    try:
        fresh_again = await measure(second, probe_question, args.n, args.tokens)
        print(f"fresh engine again: {fresh_again:.1f} tok/s", flush=True)
    finally:
        second.close()
    baseline = (fresh + fresh_again) / 2
    print(f"aged / fresh: {aged / baseline:.2f} (target >= 0.95); with the prefix cache cleared: "
          f"{cleared / baseline:.2f}")
    return {"command": " ".join(sys.argv), "model": args.model, "n": args.n, "tokens": args.tokens,
            "aging": aging | {"requests": args.requests, "concurrency": args.concurrency},
            "tok_s": {"fresh": fresh, "aged": aged, "aged_cache_cleared": cleared, "fresh_again": fresh_again},
            "aged_over_fresh": aged / baseline, "cleared_over_fresh": cleared / baseline}


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--n", type=int, default=16, help="branches of the measured request (default 16)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens each measured branch decodes (default 256)")
    parser.add_argument("--requests", type=int, default=40, help="requests that age the engine (default 40)")
    parser.add_argument("--concurrency", type=int, default=4, help="aging requests in flight at once (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
