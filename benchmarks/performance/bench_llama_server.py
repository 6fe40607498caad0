"""ponder through llama.cpp's C++ server against the same in process, side by side in one run.

The in-process engine (one batched llama.cpp context, ``--threads`` threads) and ``llama-server`` (built by
``benchmarks/testbed/llama_server.py``; ``--n`` parallel slots, continuous batching, prompt cache, the same threads) run
the same strategy on the same problems with the same seeds, alternated problem by problem so that the machine's noise
falls on both alike. Per engine: wall, prompt and generated tokens, HTTP requests, and the server's own counters (prompt
tokens it evaluated, tokens it predicted, decode calls). Results files go to ``--out`` (one per engine, ``ponder
report`` reads them) and the summary to ``--out/summary.json``.

    python -m benchmarks.performance.bench_llama_server --strategy sc --n 8 --problems 5 --max-tokens 512
    python -m benchmarks.performance.bench_llama_server --strategy auto --model qwen2.5-1.5b --problems 5

``--n`` is also the server's slot count, so that every branch of a wave can decode at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.testbed.llama_server import LlamaServer, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]  # the repository
DEFAULT_MODEL = "qwen2.5-0.5b"  # its results files keep the names they had before --model (no model in them)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="sc")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a bundled model's name (default {DEFAULT_MODEL})")
    parser.add_argument("--n", type=int, default=8, help="branches, and the server's parallel slots (default 8)")
    parser.add_argument("--problems", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "performance" / "llama-server")
    args = parser.parse_args(argv)
    if reason := unavailable_reason():
        print(reason, file=sys.stderr)
        return 2

    from ponder.bench.datasets import load_dataset
    from ponder.bench.runner import BenchConfig, read_results, run_bench
    from ponder.models import load_engine
    from ponder.engine.base import SamplingParams
    from ponder.engine.remote import OpenAIEngine
    from ponder.options import strategy_options

    dataset = load_dataset("gsm8k")
    problems = dataset.select(limit=args.problems)
    config = BenchConfig(args.strategy, args.n, SamplingParams(max_tokens=args.max_tokens), 0,
                         strategy_options(args.option))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.strategy}{args.n}-{args.max_tokens}" + ("" if args.model == DEFAULT_MODEL else f"-{args.model}")
    files = {"in-process": args.out / f"{tag}-in-process.jsonl", "llama-server": args.out / f"{tag}-llama-server.jsonl"}
    for path in files.values():
        path.unlink(missing_ok=True)
    summary: dict = {"config": {"strategy": args.strategy, "model": args.model, "n": args.n, "problems": args.problems,
                                "max_tokens": args.max_tokens, "threads": args.threads, "options": config.options,
                                "data": "gsm8k dev, first problems"}}
    local = load_engine(args.model, n_threads=args.threads)
    with LlamaServer(args.model, parallel=args.n, ctx_per_slot=args.max_tokens + 512, threads=args.threads) as server:
        remote = OpenAIEngine([server.base_url], args.model)
        counters_before = server.metrics()
        requests_before = remote.stats().decode_steps
        walls = {"in-process": 0.0, "llama-server": 0.0}
        for problem in problems:
            for name, engine in (("in-process", local), ("llama-server", remote)):
                started = time.perf_counter()
                run_bench(engine, dataset, [problem], config, files[name], progress=False)
                walls[name] += time.perf_counter() - started
                print(f"{problem.id} {name}: {time.perf_counter() - started:.1f} s", flush=True)
        counters = {k: v - counters_before.get(k, 0.0) for k, v in server.metrics().items()
                    if k.endswith("_total")}
        requests = remote.stats().decode_steps - requests_before
        remote.close()
    local.close()
    for name, path in files.items():
        _, records = read_results(path)
        usage = [r["usage"] for r in records]
        summary[name] = {
            "wall_s": round(walls[name], 1), "accuracy": sum(r["correct"] for r in records) / len(records),
            "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
            "prompt_tokens_shared": sum(u["prompt_tokens_shared"] for u in usage),
            "generated_tokens": sum(u["generated_tokens"] for u in usage),
            "results": str(path.relative_to(ROOT)),
        }
    summary["llama-server"].update(http_requests=requests, server_counters=counters)
    summary["in-process"]["http_requests"] = 0
    summary["wall_ratio_remote_over_in_process"] = round(summary["llama-server"]["wall_s"]
                                                         / summary["in-process"]["wall_s"], 2)
    (args.out / f"{tag}-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
