"""Benchmark of ``ponder serve``: concurrency scaling, HTTP overhead, and a soak test, in one run.

    python -m benchmarks.performance.bench_server                   # starts `ponder serve` on a free port of 127.0.0.1
    python -m benchmarks.performance.bench_server --url http://127.0.0.1:8000 --api-key KEY   # a server you started

Three measurements, printed side by side (the machines are noisy, so only ratios within one run mean much):

1. **Scaling**: SC requests from 1 client, and from 8 concurrent clients, alternated round by round; aggregate
   generated tokens per second. Concurrent requests' branches share the engine's batch. The same is measured on the
   in-process engine without HTTP: that ratio is what llama.cpp's batching allows on this machine, the bound for the
   server's.
2. **HTTP overhead**: the same requests (same seeds, so the same tokens) through HTTP and through the in-process
   Python API on an identically configured engine, alternated request by request; the overhead is the median extra
   time per generated token.
3. **Soak**: 32 concurrent clients x 20 requests: every status is counted (there should be no 5xx), and afterwards the
   server's /metrics must show no live branch and no KV cell in use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import openai

from ponder.engine.base import SamplingParams
from ponder.models import load_engine
from ponder.server.process import ServerProcess, free_port
from ponder.strategies import get_strategy

ROOT = Path(__file__).resolve().parents[2]  # the repository


@dataclass
class Timed:
    wall_s: float
    tokens: int
    answer: str | None


def questions(path: Path, count: int) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["question"] for line, _ in zip(f, range(count))]


def start_server(model: str | None) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "ponder.cli", "serve", "--port", str(port)] + (["--model", model] if model else [])
    return ServerProcess(command, port, timeout_s=180, env={**os.environ, "PONDER_API_KEY": ""}, cwd=str(ROOT),
                         quiet=False)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {name: float(value) for name, value in re.findall(r"^(ponder_\S+) (\S+)$", text, re.MULTILINE)}


Call = Callable[[str, int], Awaitable[Timed]]  # (question, seed) -> one timed SC request


class Bench:
    def __init__(self, url: str, api_key: str, model: str, args: argparse.Namespace):
        self.url, self.model, self.args = url, model, args
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0,
                                         timeout=600)

    async def http(self, question: str, seed: int, n: int | None = None, max_tokens: int | None = None) -> Timed:
        start = time.perf_counter()
        completion = await self.client.chat.completions.create(
            model=f"sc-{n or self.args.n}/{self.model}", messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens or self.args.max_tokens, seed=seed)
        return Timed(time.perf_counter() - start, completion.usage.completion_tokens,
                     completion.model_extra["ponder"]["answer"])

    async def soak(self, count: int, per_client: int, problems: list[str]) -> Counter:
        statuses: Counter = Counter()

        async def client(c: int):
            async with httpx.AsyncClient(base_url=self.url, timeout=600) as http:
                for i in range(per_client):
                    body = {"model": f"sc-{self.args.soak_n}/{self.model}", "max_tokens": self.args.soak_max_tokens,
                            "messages": [{"role": "user", "content": problems[(c * per_client + i) % len(problems)]}]}
                    statuses[(await http.post("/v1/chat/completions", json=body)).status_code] += 1

        await asyncio.gather(*(client(c) for c in range(count)))
        return statuses


async def clients(count: int, work: list[tuple[str, int]], call: Call) -> tuple[float, list[Timed]]:
    """``count`` concurrent clients working through ``work`` with ``call``; (wall seconds, results)."""
    pending = iter(work)
    results: list[Timed] = []

    async def client():
        for question, seed in pending:  # one shared iterator: a client takes the next request when it is free
            results.append(await call(question, seed))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(count)))
    return time.perf_counter() - start, results


async def scaling(call: Call, work: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    """Generated tokens/s of 1 client and of 8 concurrent clients, alternated round by round so that other load on
    the machine weighs on both alike."""
    walls, done = {1: 0.0, 8: 0.0}, {1: [], 8: []}
    for r in range(args.rounds):
        for count, share in ((1, work[r * args.per_client : (r + 1) * args.per_client]), (8, work)):
            wall, results = await clients(count, share, call)
            walls[count] += wall
            done[count] += results
    rate = {count: sum(t.tokens for t in done[count]) / walls[count] for count in walls}
    return {"one_client_tok_s": round(rate[1], 1), "eight_clients_tok_s": round(rate[8], 1),
            "requests": {"one": len(done[1]), "eight": len(done[8])}, "ratio": round(rate[8] / rate[1], 2)}


async def measure(bench: Bench, problems: list[str], args: argparse.Namespace) -> dict:
    work = [(problems[i % len(problems)], 1000 + i) for i in range(8 * args.per_client)]
    print(f"server {bench.url}, model {bench.model}; SC n={args.n}, max_tokens={args.max_tokens}", flush=True)
    engine = load_engine(args.model or bench.model)  # configured as `ponder serve` configures its engine
    run = get_strategy("sc")
    params = SamplingParams(max_tokens=args.max_tokens)

    async def in_process(question: str, seed: int) -> Timed:
        start = time.perf_counter()
        result = await run(engine, question, n=args.n, params=params, seed=seed)
        return Timed(time.perf_counter() - start, result.usage.generated_tokens, result.answer)

    figures = {"n": args.n, "max_tokens": args.max_tokens}
    await bench.http(problems[0], 0, args.n, 8)  # warm up: first-request costs are not what we measure
    await run(engine, problems[0], n=args.n, params=SamplingParams(max_tokens=8), seed=0)

    http = figures["scaling_http"] = await scaling(bench.http, work, args)
    print(f"\n1. scaling over HTTP  1 client : {http['one_client_tok_s']:6.1f} tok/s\n"
          f"                      8 clients: {http['eight_clients_tok_s']:6.1f} tok/s   -> {http['ratio']:.2f}x "
          "(target >= 2.5x)", flush=True)
    local = figures["scaling_in_process"] = await scaling(in_process, work, args)
    print(f"   the same in-process: 1 client {local['one_client_tok_s']:.1f}, 8 clients "
          f"{local['eight_clients_tok_s']:.1f} tok/s -> {local['ratio']:.2f}x: the engine's own batching bound; the "
          f"server keeps {http['ratio'] / local['ratio']:.0%} of it", flush=True)

    per_token_ratios, same = [], 0
    for question, seed in work[: args.overhead_requests]:  # alternated request by request
        mine = await in_process(question, seed)
        remote = await bench.http(question, seed)
        same += mine.tokens == remote.tokens and mine.answer == remote.answer
        per_token_ratios.append((remote.wall_s / remote.tokens) / (mine.wall_s / mine.tokens))
    engine.close()
    overhead = statistics.median(per_token_ratios) - 1
    figures["http_overhead"] = {"median_per_token": round(overhead, 4), "pairs": len(per_token_ratios),
                                "identical_outputs": same}
    print(f"\n2. HTTP overhead vs in-process: median {overhead * 100:+.1f} % per generated token over "
          f"{len(per_token_ratios)} alternated requests (target <= 5 %); identical outputs "
          f"{same}/{len(per_token_ratios)}", flush=True)

    if args.soak_clients:
        figures["soak"] = await soak(bench, problems, args)
    return figures


async def soak(bench: Bench, problems: list[str], args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    statuses = await bench.soak(args.soak_clients, args.soak_requests, problems)
    soak_wall = time.perf_counter() - start
    after = metrics(bench.url)
    server_errors = sum(count for status, count in statuses.items() if status >= 500)
    print(f"\n3. soak: {args.soak_clients} clients x {args.soak_requests} requests (SC n={args.soak_n}, "
          f"max_tokens={args.soak_max_tokens}) in {soak_wall:.0f} s; statuses {dict(statuses)}; 5xx: "
          f"{server_errors}; after: live branches {after['ponder_live_branches']:.0f}, KV cells "
          f"{after['ponder_kv_cells_used']:.0f}, queue {after['ponder_queue_length']:.0f}", flush=True)
    return {"clients": args.soak_clients, "requests_per_client": args.soak_requests, "n": args.soak_n,
            "max_tokens": args.soak_max_tokens, "wall_s": round(soak_wall, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "server_errors": server_errors,
            "after": {k: after[f"ponder_{k}"] for k in ("live_branches", "kv_cells_used", "queue_length")}}


async def main(args: argparse.Namespace) -> None:
    problems = questions(args.data, 8 * args.per_client)
    with contextlib.nullcontext(args.url) if args.url else start_server(args.model) as server:
        url = server if args.url else server.url
        model = httpx.get(f"{url}/health").json()["model"]
        bench = Bench(url, args.api_key, model, args)
        try:
            figures = await measure(bench, problems, args)
        finally:
            await bench.client.close()
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), **figures}, indent=2) + "\n")
        print(f"\nfigures written to {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running ponder server (default: start `ponder serve`)")
    parser.add_argument("--api-key", default=os.environ.get("PONDER_API_KEY", ""))
    parser.add_argument("--model", default=None, help="model for the started server and the in-process engine")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k_dev.jsonl")
    parser.add_argument("--n", type=int, default=4, help="SC branches per request (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per branch (default: 64)")
    parser.add_argument("--rounds", type=int, default=4, help="alternated scaling rounds (default: 4)")
    parser.add_argument("--per-client", type=int, default=2,
                        help="requests per client per round: the single client sends this many, the 8 clients 8x "
                             "as many (default: 2)")
    parser.add_argument("--overhead-requests", type=int, default=8, help="alternated pairs (default: 8)")
    parser.add_argument("--soak-clients", type=int, default=32, help="0 skips the soak")
    parser.add_argument("--soak-requests", type=int, default=20, help="requests per soak client (default: 20)")
    parser.add_argument("--soak-n", type=int, default=2)
    parser.add_argument("--soak-max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
