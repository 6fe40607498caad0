"""Faults survived, nothing lost: ``ponder bench`` over several llama-server endpoints while they fail.

Two real ``llama-server`` processes (A and B, built by ``benchmarks/testbed/llama_server.py``: N parallel slots,
continuous batching) and a third endpoint C, a proxy in front of B (``benchmarks/peers/counting_proxy.py``) that can be
switched to answer every request with 503. ponder's remote engine routes over the three URLs (least loaded first). Three
phases on the same problems (GSM8K dev, the first ``--problems``):

1. **quiet**: no fault. Its per-problem wall is the baseline, and the servers' own counters check ponder's token
   accounting (``llamacpp:tokens_predicted_total`` of A and B against the tokens ponder counted).
2. **faults**: while the bench runs, A is killed (SIGKILL) and restarted on the same port, B hangs (SIGSTOP for
   ``--hang-s`` seconds, then SIGCONT; C, in front of it, hangs with it), and C answers 503 for ``--503-s`` seconds.
   A problem whose run fails anyway (every retry used up) stops the bench with its error, and the bench is resumed
   (``run_bench`` again on the same file), as a user would rerun the command.
3. **self-kill**: the ``ponder bench`` command itself is SIGKILLed once two problems are in its file, then rerun.
4. **serve-quiet** and **serve-faults**: ``ponder serve`` (a real server process) over the same endpoints, with
   ``--clients`` clients sending ``--serve-requests`` chat requests between them, quiet and then under the same fault
   schedule. Every request must get 200 or a clear 4xx/5xx JSON error within ``--client-timeout`` (else it counts as
   hung); reported: statuses, errors, p50/p99 latency of requests that overlapped a fault against the others, and
   (quiet) the completion tokens the answers report against what A and B decoded.

Every phase checks that its results file ends with every problem exactly once, and that each problem's usage adds up
(generated tokens = the branches' + the one token of the prompt's request). Printed and written to
``--out/faults.json``: requests, faults injected, retries, resumed extends, hung servers seen, problems lost (target
0), p50/p99 wall per problem during faults against quiet.

    python -m benchmarks.robustness.bench_faults --problems 6 --n 4 --max-tokens 96
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from starlette.responses import JSONResponse

from benchmarks.peers.counting_proxy import CountingProxy
from benchmarks.testbed.llama_server import LlamaServer, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]  # the repository

MODEL = "qwen2.5-0.5b"


class FaultProxy(CountingProxy):
    """The counting proxy, which can be told to answer everything with 503 (``failing``)."""

    failing = False
    refused = 0

    async def _handle(self, request):
        if self.failing:
            self.refused += 1
            return JSONResponse({"error": {"message": "injected fault: service unavailable"}}, status_code=503)
        return await super()._handle(request)


@dataclass
class Injector:
    """Runs the fault schedule in a thread; ``windows`` are the (start, end, what) of each fault, in time.time()."""

    a: LlamaServer
    b: LlamaServer
    c: FaultProxy
    at: dict[str, float]  # seconds after start: kill, hang, 503
    hang_s: float
    unavailable_s: float
    windows: list[tuple[float, float, str]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _wait_until(self, t0: float, offset: float) -> bool:
        return not self.done.wait(max(0.0, t0 + offset - time.monotonic()))

    def _run(self) -> None:
        try:
            t0 = time.monotonic()
            if self._wait_until(t0, self.at["kill"]):
                started = time.time()
                self.a.kill()
                self.a.start()  # the same port; blocks until it answers /health
                self.windows.append((started, time.time(), "A killed (SIGKILL) and restarted"))
            if self._wait_until(t0, self.at["hang"]):
                started = time.time()
                self.b.pause()
                self.done.wait(self.hang_s)
                self.b.resume()
                self.windows.append((started, time.time(), f"B hung (SIGSTOP {self.hang_s:g} s)"))
            if self._wait_until(t0, self.at["503"]):
                started = time.time()
                self.c.failing = True
                self.done.wait(self.unavailable_s)
                self.c.failing = False
                self.windows.append((started, time.time(), f"C answered 503 for {self.unavailable_s:g} s"))
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.b.resume()
            self.c.failing = False


def fault_schedule(a: LlamaServer, b: LlamaServer, c: FaultProxy, span: float, args) -> Injector:
    """The faults of a phase that takes about ``span`` seconds when quiet: A killed at a tenth of it, B hung at 35 %,
    C failing 5 s after B resumes."""
    return Injector(a, b, c, at={"kill": 0.1 * span, "hang": 0.35 * span, "503": 0.35 * span + args.hang_s + 5},
                    hang_s=args.hang_s, unavailable_s=args.unavailable_s)


@contextmanager
def faults_running(injector: Injector | None):
    """The injector's fault schedule runs in its thread while the block runs; then it is stopped and joined, and an
    error it met is raised."""
    thread = injector.start() if injector else None
    try:
        yield
    finally:
        if injector:
            injector.done.set()
            thread.join(timeout=120)
    if injector and injector.error:
        raise injector.error


def overlaps(started: float, finished: float, windows: list[tuple[float, float, str]]) -> bool:
    """Whether a request or problem that ran from ``started`` to ``finished`` overlapped a fault window."""
    return any(s <= finished and started <= e for s, e, _ in windows)


def check_results(path: Path, ids: list[str]) -> dict:
    """Exactly once, and the usage of every record adds up."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = lines[1:]
    seen = [r["id"] for r in records]
    mismatched = []
    for r in records:
        if r.get("error"):
            continue
        branches = sum(b["generated_tokens"] for b in r["branches"])
        if r["usage"]["generated_tokens"] != branches + 1:
            mismatched.append(r["id"])
    return {"problems": len(ids), "answered": len(set(seen) & set(ids)), "duplicates": len(seen) - len(set(seen)),
            "lost": len(set(ids) - set(seen)), "errors": sum(bool(r.get("error")) for r in records),
            "usage_mismatches": mismatched, "accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
            "generated_tokens": sum(r["usage"]["generated_tokens"] for r in records)}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"count": len(values), "p50": round(statistics.median(values), 2), "p99": round(pick(0.99), 2),
            "max": round(ordered[-1], 2)}


def problem_walls(path: Path, windows: list[tuple[float, float, str]] | None = None) -> tuple[list, list]:
    """Wall per problem, split into those whose run overlapped a fault window and the others."""
    records = [json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip()]
    during, outside = [], []
    for r in records:
        started, finished = r["started"], r["finished"]
        (during if overlaps(started, finished, windows or []) else outside).append(r["wall_s"])
    return during, outside


def run_phase(name: str, urls: list[str], out: Path, args, injector: Injector | None = None,
              max_attempts: int = 4) -> dict:
    from ponder.bench.datasets import load_dataset
    from ponder.bench.runner import BenchConfig, run_bench
    from ponder.engine.base import PonderError, SamplingParams
    from ponder.engine.remote import OpenAIEngine

    dataset = load_dataset("gsm8k")
    problems = dataset.select(limit=args.problems)
    config = BenchConfig("sc", args.n, SamplingParams(max_tokens=args.max_tokens), 0, {})
    out.unlink(missing_ok=True)
    totals = {"requests": 0, "retries": 0, "resumed": 0, "hung": 0, "generated_tokens": 0}
    attempts, errors = 0, []
    started = time.time()
    with faults_running(injector):
        while attempts < max_attempts:
            attempts += 1
            engine = OpenAIEngine(urls, MODEL)
            try:
                run_bench(engine, dataset, problems, config, out, concurrency=args.concurrency, progress=False)
                break
            except PonderError as exc:  # the problem's error; the bench stops, and is resumed
                errors.append(f"{type(exc).__name__}: {exc}")
                print(f"  [{name}] the bench stopped: {exc}; resuming", flush=True)
            finally:
                stats = engine.stats()
                totals["requests"] += stats.decode_steps
                totals["generated_tokens"] += stats.generated_tokens
                for key in ("retries", "resumed", "hung"):
                    totals[key] += engine.faults[key]
                engine.close()
    wall = time.time() - started
    result = {"phase": name, "wall_s": round(wall, 1), "bench_attempts": attempts, "bench_errors": errors,
              **totals, **check_results(out, [p.id for p in problems])}
    return result


def self_kill_phase(urls: list[str], out: Path, args) -> dict:
    """``ponder bench`` killed with SIGKILL once two problems are in its file, then run again to the end."""
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "ponder.cli", "bench", "--data", "gsm8k", "--limit", str(args.problems),
               "--strategy", "sc", "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--engine", "openai",
               "--model", MODEL, *[x for url in urls for x in ("--base-url", url)],
               "--concurrency", str(args.concurrency), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 3:  # the header and two problems
            break
        time.sleep(0.2)
    killed_with = None
    if first.poll() is None:
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_with = len(out.read_text().splitlines()) - 1
    second = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=1800)
    return {"phase": "self-kill", "killed_after_problems": killed_with, "rerun_status": second.returncode,
            "rerun_output": second.stdout.strip().splitlines()[-1:] + second.stderr.strip().splitlines()[-2:],
            **check_results(out, _ids(args))}


def _problems(args) -> list:
    from ponder.bench.datasets import load_dataset

    return load_dataset("gsm8k").select(limit=args.problems)


def _ids(args) -> list[str]:
    return [p.id for p in _problems(args)]


def serve_phase(name: str, urls: list[str], args, injector: Injector | None = None) -> dict:
    """``ponder serve`` over the endpoints (a real server process), ``--clients`` clients sending
    ``--serve-requests`` of the problems' questions between them, each one request after another (sc, ``--n``
    branches); with ``injector``, the faults run meanwhile. Every
    request must end in 200 or a clear 4xx/5xx JSON error within the client's timeout (a timeout is a hang)."""
    import httpx

    from ponder.server.process import ServerProcess, free_port

    port = free_port()
    command = [sys.executable, "-m", "ponder.cli", "serve", "--port", str(port), "--engine", "openai", "--model", MODEL,
               *[x for url in urls for x in ("--base-url", url)], "--strategy", "sc", "--n", str(args.n),
               "--max-running", str(args.clients)]
    problems = _problems(args)
    questions = [problems[i % len(problems)].question for i in range(args.serve_requests)]
    outcomes: list[dict] = []
    lock = threading.Lock()

    def client(k: int, model: str) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=args.client_timeout) as http:
            for i, question in enumerate(questions[k::args.clients]):
                body = {"model": model, "messages": [{"role": "user", "content": question}],
                        "max_tokens": args.max_tokens, "seed": i, "ponder": {"strategy": "sc", "n": args.n}}
                started = time.time()
                outcome = {"client": k, "started": started}
                try:
                    response = http.post("/v1/chat/completions", json=body)
                    outcome["status"] = response.status_code
                    payload = response.json()
                    if response.status_code == 200:
                        outcome["completion_tokens"] = payload["usage"]["completion_tokens"]
                    else:
                        outcome["error"] = payload.get("error", {}).get("message", "")[:200]
                except httpx.TimeoutException:
                    outcome["status"] = "timeout"
                except (httpx.TransportError, ValueError) as exc:
                    outcome["status"] = f"broken: {type(exc).__name__}"
                outcome["finished"] = time.time()
                outcome["wall_s"] = round(outcome["finished"] - started, 2)
                with lock:
                    outcomes.append(outcome)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with ServerProcess(command, port, env=env, cwd=str(ROOT)) as server:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        started = time.time()
        clients = [threading.Thread(target=client, args=(k, model)) for k in range(args.clients)]
        with faults_running(injector):
            for c in clients:
                c.start()
            for c in clients:
                c.join()
        wall = time.time() - started
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o["status"])] = statuses.get(str(o["status"]), 0) + 1
    windows = injector.windows if injector else []
    during = [o["wall_s"] for o in outcomes if overlaps(o["started"], o["finished"], windows)]
    outside = [o["wall_s"] for o in outcomes if not overlaps(o["started"], o["finished"], windows)]
    return {"phase": name, "wall_s": round(wall, 1), "requests": len(outcomes), "statuses": statuses,
            "hung": statuses.get("timeout", 0), "errors": sorted({o["error"] for o in outcomes if o.get("error")}),
            "completion_tokens": sum(o.get("completion_tokens", 0) for o in outcomes),
            "latency_during_faults": percentiles(during), "latency_outside_faults": percentiles(outside)}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def server_generated(servers: list[LlamaServer]) -> float:
    return sum(s.metrics().get("llamacpp:tokens_predicted_total", 0.0) for s in servers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=2, help="problems in flight")
    parser.add_argument("--parallel", type=int, default=4, help="slots of each llama-server")
    parser.add_argument("--threads", type=int, default=1, help="threads of each llama-server")
    parser.add_argument("--hang-s", type=float, default=20.0)
    parser.add_argument("--503-s", dest="unavailable_s", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4,
                        help="clients of the serve phases, each one request at a time")
    parser.add_argument("--client-timeout", type=float, default=300.0,
                        help="seconds a serve-phase client waits for an answer; longer counts as a hang")
    parser.add_argument("--serve-requests", type=int, default=24, help="requests of each serve phase, all clients")
    parser.add_argument("--phases", default="quiet,faults,self-kill,serve-quiet,serve-faults",
                        help="comma-separated phases to run, in this order (default: all five)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness" / "faults")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    report: dict = {"config": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "phases": []}
    with LlamaServer(MODEL, parallel=args.parallel, threads=args.threads) as a, \
            LlamaServer(MODEL, parallel=args.parallel, threads=args.threads) as b, \
            FaultProxy(b.url) as c:
        urls = [a.base_url, b.base_url, c.base_url("ponder")]
        quiet_wall = None
        if "quiet" in phases:
            before = server_generated([a, b])
            quiet = run_phase("quiet", urls, args.out / "quiet.jsonl", args)
            # Server-side check: what A and B generated (C forwards to B) against what ponder counted, minus the one
            # token of each engine's start-up probe (whether n is honoured) per URL.
            quiet["server_generated_tokens"] = server_generated([a, b]) - before
            quiet["ponder_generated_tokens"] = quiet["generated_tokens"]
            quiet["walls"] = percentiles(problem_walls(args.out / "quiet.jsonl")[1])
            report["phases"].append(quiet)
            quiet_wall = quiet["wall_s"]
            print(json.dumps(quiet), flush=True)
        if "faults" in phases:
            span = quiet_wall or 60.0
            injector = fault_schedule(a, b, c, span, args)
            faults = run_phase("faults", urls, args.out / "faults.jsonl", args, injector=injector)
            during, outside = problem_walls(args.out / "faults.jsonl", injector.windows)
            faults.update(faults_injected=[w[2] for w in injector.windows], fault_windows=injector.windows,
                          refused_503=c.refused, walls_during_faults=percentiles(during),
                          walls_outside_faults=percentiles(outside))
            report["phases"].append(faults)
            print(json.dumps(faults), flush=True)
        if "self-kill" in phases:
            killed = self_kill_phase(urls, args.out / "self-kill.jsonl", args)
            report["phases"].append(killed)
            print(json.dumps(killed), flush=True)
        serve_wall = None
        if "serve-quiet" in phases:
            before = server_generated([a, b])
            served = serve_phase("serve-quiet", urls, args)
            # ponder serve's answers report the completion tokens of every branch; A and B count what they decoded
            # (plus the one token of each engine start-up probe per URL).
            served["server_generated_tokens"] = server_generated([a, b]) - before
            report["phases"].append(served)
            serve_wall = served["wall_s"]
            print(json.dumps(served), flush=True)
        if "serve-faults" in phases:
            span = serve_wall or 60.0
            injector = fault_schedule(a, b, c, span, args)
            served = serve_phase("serve-faults", urls, args, injector=injector)
            served.update(faults_injected=[w[2] for w in injector.windows], fault_windows=injector.windows)
            report["phases"].append(served)
            print(json.dumps(served), flush=True)
    (args.out / "faults.json").write_text(json.dumps(report, indent=1) + "\n")
    lost = sum(p.get("lost", 0) + p.get("duplicates", 0) for p in report["phases"])
    hung = sum(p.get("hung", 0) for p in report["phases"] if p["phase"].startswith("serve"))
    print(f"problems lost or duplicated: {lost}; serve requests hung: {hung}; written to {args.out / 'faults.json'}")
    return 0 if lost == 0 and hung == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
