"""Benchmark of the prefix cache: requests that share a long prefix (few-shot examples), with and without the cache.

    python -m benchmarks.performance.bench_prefix      # 20 requests, a ~1,000-token prefix, engine and server
    python -m benchmarks.performance.bench_prefix --requests 3 --prefix-tokens 200 --max-tokens 4 --no-server  # smoke

Every request is a GSM8K question whose system message holds worked GSM8K examples (question, solution, answer):
the same few-shot prefix for all, as a benchmark's instructions or a client's system prompt repeat. Two identically
configured engines serve the same requests, one with the prefix cache (``prefix_cache_tokens``, the default size)
and one without (``prefix_cache_tokens=0``), alternated request by request so that other load on the machine weighs
on both alike. One client, one request at a time: time to first token is then the prompt's evaluation plus one
decode step, the cost the cache removes.

1. **Engine**: ``open`` + greedy ``extend`` on the in-process engine; time to first token is taken when the first
   token arrives (``stop_if``), and the greedy tokens of both engines are compared. They may differ where the top two
   tokens nearly tie: llama.cpp's results depend slightly on the batch a token is evaluated in (a prompt evaluated in
   one piece, or after a cached prefix, or beside another prompt). Measured on a GSM8K prompt without any cache: the
   log-probability gap between its two best first tokens, 0.05, changed sign when the prompt was evaluated beside
   another one. So the count of identical outputs comes with the position of the first differing token of each
   pair; the tests (``tests/engine/test_engine_llamacpp.py``) check exact identity on prompts without such ties.
2. **Server**: the same requests over HTTP on 127.0.0.1 to two servers (``greedy/MODEL``, ``max_tokens`` 1: the
   answer comes once the strategy has its token, so the request's time is its time to first token). Each server is
   this script in a child process running ``ponder serve``'s app on an engine of the given cache size and of the
   same ``n_ctx`` as the engine part (``ponder serve`` has no option for the context size).

Printed: median time to first token without and with the cache over the requests after the first (the first one
fills the cache), their ratio (target >= 5x), and prompt tokens evaluated vs cached. Results in
benchmarks/results/performance/prefix.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from ponder.engine import SamplingParams, Usage
from ponder.models import load_engine
from ponder.prompts import MathPrompt
from ponder.server.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository

DATA = ROOT.parent / "shared" / "data" / "gsm8k_dev.jsonl"
MODES = ("no_cache", "cache")


def few_shot_and_questions(path: Path, prefix_tokens: int, requests: int, count_tokens) -> tuple[str, list[str]]:
    """Worked examples from the start of ``path`` until the system message reaches ``prefix_tokens`` tokens, and the
    next ``requests`` questions."""
    with open(path) as f:
        problems = [json.loads(line) for line in f]
    shots = ["Solve grade-school math problems. Worked examples:"]
    used = 0
    while count_tokens("\n\n".join(shots)) < prefix_tokens:
        p = problems[used]
        solution = p.get("solution", "").split("####")[0].strip()
        shots.append(f"Question: {p['question']}\nSolution: {solution}\nAnswer: \\boxed{{{p['answer']}}}")
        used += 1
    questions = [p["question"] for p in problems[used: used + requests]]
    if len(questions) < requests:
        raise SystemExit(f"{path} has too few problems for {requests} requests after {used} examples")
    return "\n\n".join(shots), questions


def summary(records: list[dict]) -> dict:
    """Median time to first token over the requests after the first (the first one fills the cache), and token
    counts over all of them."""
    later = [r["ttft_s"] for r in records[1:]] or [records[0]["ttft_s"]]
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["prompt_tokens_cached"] for r in records)
    return {"ttft_median_s": round(statistics.median(later), 4), "ttft_first_s": round(records[0]["ttft_s"], 4),
            "prompt_tokens": prompt, "prompt_tokens_cached": cached, "prompt_tokens_evaluated": prompt - cached,
            "requests": records}


def report(title: str, figures: dict) -> None:
    off, on = figures["no_cache"], figures["cache"]
    print(f"\n{title}: time to first token, median of requests 2..{len(on['requests'])}: "
          f"{off['ttft_median_s'] * 1000:.0f} ms without the cache, {on['ttft_median_s'] * 1000:.0f} ms with it "
          f"-> {figures['ttft_ratio']:.1f}x (target >= 5x)", flush=True)
    for mode in MODES:
        f = figures[mode]
        print(f"   {mode:9s} prompt tokens {f['prompt_tokens']}: evaluated {f['prompt_tokens_evaluated']}, "
              f"cached {f['prompt_tokens_cached']}; first request {f['ttft_first_s'] * 1000:.0f} ms", flush=True)


# ---- 1. the in-process engine ------------------------------------------------------------------------------------

async def engine_request(engine, messages, max_tokens: int) -> dict:
    usage = Usage()
    first: list[float] = []

    def first_token(branch) -> bool:
        if not first:
            first.append(time.perf_counter())
        return False

    start = time.perf_counter()
    root = await engine.open(messages, usage)
    try:
        await root.extend(SamplingParams(temperature=0.0, max_tokens=max_tokens), stop_if=first_token)
    finally:
        root.release()
    first_at = first[0] if first else time.perf_counter()  # no token: the first one ended the generation
    return {"ttft_s": first_at - start, "prompt_tokens": usage.prompt_tokens,
            "prompt_tokens_cached": usage.prompt_tokens_cached, "tokens": root.tokens}


async def bench_engine(engines: dict, prompt: MathPrompt, questions: list[str], max_tokens: int) -> dict:
    records: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for question in questions:
        for mode in MODES:  # alternated request by request
            records[mode].append(await engine_request(engines[mode], prompt.messages(question), max_tokens))
    pairs = list(zip(records["no_cache"], records["cache"]))
    identical = sum(a["tokens"] == b["tokens"] for a, b in pairs)
    differ_at = [next(i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y)
                 for a, b in pairs if a["tokens"] != b["tokens"]]
    for mode in MODES:
        for r in records[mode]:
            del r["tokens"]
    figures = {mode: summary(records[mode]) for mode in MODES}
    figures["ttft_ratio"] = round(figures["no_cache"]["ttft_median_s"] / figures["cache"]["ttft_median_s"], 2)
    figures["identical_greedy_outputs"] = f"{identical}/{len(questions)}"
    figures["first_differing_token"] = differ_at
    return figures


# ---- 2. the server -------------------------------------------------------------------------------------------------

def serve(args: argparse.Namespace) -> None:
    """The child process: ``ponder serve``'s app on an engine with the asked prefix cache size."""
    from ponder.server.app import create_app
    from ponder.server.config import ServerConfig
    from ponder.server.guards import uvicorn_server

    config = ServerConfig(default_strategy="greedy", default_n=1)
    engine = load_engine(args.model, n_ctx=args.n_ctx, prefix_cache_tokens=args.serve_cache_tokens)
    try:
        uvicorn_server(create_app(engine, config), config, host="127.0.0.1", port=args.serve,
                       log_level="warning").run()
    finally:
        engine.close()


def start_server(args: argparse.Namespace, cache_tokens: int) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", __spec__.name, "--serve", str(port), "--serve-cache-tokens", str(cache_tokens),
               "--n-ctx", str(args.n_ctx)] + (["--model", args.model] if args.model else [])
    return ServerProcess(command, port, timeout_s=180, cwd=str(ROOT), quiet=False)


def server_request(client: httpx.Client, model: str, system: str, question: str) -> dict:
    body = {"model": f"greedy/{model}", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    wall = time.perf_counter() - start
    response.raise_for_status()
    answer = response.json()
    usage = answer["ponder"]["usage"]
    return {"ttft_s": wall, "prompt_tokens": usage["prompt_tokens"],
            "prompt_tokens_cached": usage.get("prompt_tokens_cached", 0),
            "reported_cached_tokens": (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")}


def bench_server(args: argparse.Namespace, system: str, questions: list[str]) -> dict:
    records: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with start_server(args, 0) as plain, start_server(args, args.cache_tokens) as cached:
        servers = {"no_cache": plain, "cache": cached}
        clients = {mode: httpx.Client(base_url=servers[mode].url, timeout=600) for mode in MODES}
        model = clients["cache"].get("/health").json()["model"]
        for question in questions:
            for mode in MODES:  # alternated request by request
                records[mode].append(server_request(clients[mode], model, system, question))
        for client in clients.values():
            client.close()
    figures = {mode: summary(records[mode]) for mode in MODES}
    figures["ttft_ratio"] = round(figures["no_cache"]["ttft_median_s"] / figures["cache"]["ttft_median_s"], 2)
    return figures


def main(args: argparse.Namespace) -> None:
    engines = {"no_cache": load_engine(args.model, n_ctx=args.n_ctx, prefix_cache_tokens=0),
               "cache": load_engine(args.model, n_ctx=args.n_ctx, prefix_cache_tokens=args.cache_tokens)}
    try:
        reference = engines["cache"]
        system, questions = few_shot_and_questions(
            args.data, args.prefix_tokens, args.requests, lambda text: len(reference.tokenize(text)))
        prefix = len(reference.tokenize(reference.format_chat([{"role": "system", "content": system}])))
        print(f"model {reference.model.name}, {args.requests} requests sharing a prefix of {prefix} tokens (the "
              f"system message with its chat markup), greedy, {args.max_tokens} tokens each", flush=True)
        results = {"config": {"model": reference.model.name, "requests": args.requests, "prefix_tokens": prefix,
                              "max_tokens": args.max_tokens, "n_ctx": args.n_ctx, "cache_tokens": args.cache_tokens}}
        results["engine"] = asyncio.run(bench_engine(engines, MathPrompt(system), questions, args.max_tokens))
    finally:
        for engine in engines.values():
            engine.close()
    report("1. engine", results["engine"])
    differing = results["engine"]["first_differing_token"]
    print(f"   identical greedy outputs: {results['engine']['identical_greedy_outputs']}"
          + (f" (the others first differ at token {differing}: a near-tie, see the module docstring)" if differing
             else ""), flush=True)
    if args.server:
        results["server"] = bench_server(args, system, questions)
        report("2. ponder serve over HTTP (max_tokens 1)", results["server"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {args.out}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ponder.engine.prefix_cache import PREFIX_CACHE_TOKENS

    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or GGUF path (default: the bundled 0.5B)")
    parser.add_argument("--requests", type=int, default=20, help="requests sharing the prefix (default: 20)")
    parser.add_argument("--prefix-tokens", type=int, default=1000,
                        help="worked examples are added until the system message has this many tokens (default: 1000)")
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="greedy tokens per request on the engine, compared between the two (default: 16)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context of every engine (default: 4096)")
    parser.add_argument("--cache-tokens", type=int, default=PREFIX_CACHE_TOKENS,
                        help=f"prefix cache size of the cached side (default: {PREFIX_CACHE_TOKENS})")
    parser.add_argument("--data", type=Path, default=DATA, help="GSM8K JSONL: examples and questions")
    parser.add_argument("--no-server", dest="server", action="store_false", help="measure the engine only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "performance" / "prefix.json",
                        help="results file (default: benchmarks/results/performance/prefix.json)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the child server process
    parser.add_argument("--serve-cache-tokens", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve is not None:
        serve(arguments)
    else:
        main(arguments)
