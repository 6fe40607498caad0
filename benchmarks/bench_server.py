"""Benchmark of ``ponder serve``: concurrency scaling, HTTP overhead, and a soak test, in one run.

    python benchmarks/bench_server.py                   # starts `ponder serve` on a free port of 127.0.0.1
    python benchmarks/bench_server.py --url http://127.0.0.1:8000 --api-key KEY   # a server you started

Three measurements, printed side by side (the machines are noisy, so only ratios within one run mean much):

1. **Scaling**: SC requests from 1 client, and from 8 concurrent clients, alternated round by round; aggregate
   generated tokens per second. Concurrent requests' branches share the engine's batch, so 8 clients should get
   well over 2.5x.
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

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ponder.engine import load_engine  # noqa: E402
from ponder.engine.base import SamplingParams  # noqa: E402
from ponder.server.process import ServerProcess, free_port  # noqa: E402
from ponder.strategies import get_strategy  # noqa: E402


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


class Bench:
    def __init__(self, url: str, api_key: str, model: str, args: argparse.Namespace):
        self.url, self.model, self.args = url, model, args
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0,
                                         timeout=600)

    async def http(self, question: str, seed: int, n: int, max_tokens: int) -> Timed:
        start = time.perf_counter()
        completion = await self.client.chat.completions.create(
            model=f"sc-{n}/{self.model}", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            seed=seed)
        return Timed(time.perf_counter() - start, completion.usage.completion_tokens,
                     completion.model_extra["ponder"]["answer"])

    async def clients(self, count: int, work: list[tuple[str, int]]) -> tuple[float, list[Timed]]:
        """``count`` concurrent clients working through ``work``; (wall seconds, results)."""
        queue: asyncio.Queue = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        results: list[Timed] = []

        async def client():
            while not queue.empty():
                question, seed = queue.get_nowait()
                results.append(await self.http(question, seed, self.args.n, self.args.max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(count)))
        return time.perf_counter() - start, results

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


async def main(args: argparse.Namespace) -> None:
    problems = questions(args.data, 8 * args.per_client)
    with contextlib.nullcontext(args.url) if args.url else start_server(args.model) as server:
        url = server if args.url else server.url
        model = httpx.get(f"{url}/health").json()["model"]
        bench = Bench(url, args.api_key, model, args)
        try:
            await measure(bench, problems, args)
        finally:
            await bench.client.close()


async def measure(bench: Bench, problems: list[str], args: argparse.Namespace) -> None:
    work = [(problems[i % len(problems)], 1000 + i) for i in range(8 * args.per_client)]
    print(f"server {bench.url}, model {bench.model}; SC n={args.n}, max_tokens={args.max_tokens}")

    await bench.http(problems[0], 0, args.n, 8)  # warm up: first-request costs are not what we measure
    # Alternate the two modes round by round, so that other load on the machine weighs on both alike.
    one_wall = eight_wall = 0.0
    one, eight = [], []
    for r in range(args.rounds):
        wall, results = await bench.clients(1, work[r * args.per_client : (r + 1) * args.per_client])
        one_wall, one = one_wall + wall, one + results
        wall, results = await bench.clients(8, work)
        eight_wall, eight = eight_wall + wall, eight + results
    one_rate = sum(r.tokens for r in one) / one_wall
    eight_rate = sum(r.tokens for r in eight) / eight_wall
    print(f"\n1. scaling      1 client : {one_rate:6.1f} tok/s  {len(one) / one_wall:5.2f} req/s  ({len(one)} requests)")
    print(f"                8 clients: {eight_rate:6.1f} tok/s  {len(eight) / eight_wall:5.2f} req/s  ({len(eight)} "
          f"requests)   -> {eight_rate / one_rate:.2f}x (target >= 2.5x)")

    engine = load_engine(args.model or bench.model)  # configured as `ponder serve` configures its engine
    run = get_strategy("sc")
    params = SamplingParams(max_tokens=args.max_tokens)
    await run(engine, problems[0], n=args.n, params=SamplingParams(max_tokens=8), seed=0)  # warm up
    per_token_ratios, same = [], 0
    for question, seed in work[: args.overhead_requests]:
        start = time.perf_counter()
        result = await run(engine, question, n=args.n, params=params, seed=seed)
        local = Timed(time.perf_counter() - start, result.usage.generated_tokens, result.answer)
        remote = await bench.http(question, seed, args.n, args.max_tokens)
        same += local.tokens == remote.tokens and local.answer == remote.answer
        per_token_ratios.append((remote.wall_s / remote.tokens) / (local.wall_s / local.tokens))
    engine.close()
    overhead = statistics.median(per_token_ratios) - 1
    print(f"\n2. HTTP overhead vs in-process: median {overhead * 100:+.1f} % per generated token over "
          f"{len(per_token_ratios)} alternated requests (target <= 5 %); identical outputs "
          f"{same}/{len(per_token_ratios)}")

    if args.soak_clients:
        await soak(bench, problems, args)


async def soak(bench: Bench, problems: list[str], args: argparse.Namespace) -> None:
    start = time.perf_counter()
    statuses = await bench.soak(args.soak_clients, args.soak_requests, problems)
    soak_wall = time.perf_counter() - start
    after = metrics(bench.url)
    server_errors = sum(count for status, count in statuses.items() if status >= 500)
    print(f"\n3. soak: {args.soak_clients} clients x {args.soak_requests} requests (SC n={args.soak_n}, "
          f"max_tokens={args.soak_max_tokens}) in {soak_wall:.0f} s; statuses {dict(statuses)}; 5xx: "
          f"{server_errors}; after: live branches {after['ponder_live_branches']:.0f}, KV cells "
          f"{after['ponder_kv_cells_used']:.0f}, queue {after['ponder_queue_length']:.0f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
