"""Benchmark of ``ponder serve`` under hostile load: legitimate clients' latency beside hostile ones, in one run.

    python -m benchmarks.robustness.bench_hostile --out benchmarks/results/robustness/hostile.json  # ponder serve, 0.5B
    python -m benchmarks.robustness.bench_hostile --fake --requests 3      # the fake engine: checks the harness

Everything is on 127.0.0.1 and bounded: a fixed number of legitimate requests per phase, hostile operations that
each end within their own deadline, and ``--deadline-s`` over the whole run; the server is stopped at the end.

Phases alternate, ``--rounds`` times: *quiet* (only the legitimate clients) and *hostile* (the same legitimate
requests, same questions and seeds, while hostile clients loop). Legitimate clients send SC requests from 127.0.0.1;
each kind of hostile client has its own address (127.0.0.10, .11, ...), so the per-client cap sees them apart:

* ``oversize``: a body twice the server's limit (expect 413);
* ``huge_prompt``: a prompt of half a million tokens, just within the body limit (expect 400, or 429 once the
  client has spent its starts: a prompt too long for the context spends one);
* ``malformed``: truncated JSON (expect 400);
* ``slow_body``: the headers, then one body byte per second (expect 408);
* ``slow_headers``: one header line per second (expect the server to close the connection);
* ``unread_stream``: a streamed answer the client never reads, on a plain socket that takes nothing from the kernel
  (expect the server to let go of it within ``send_timeout_s`` of its first byte, whether or not it fitted in the
  socket buffers: its end of the connection is gone from /proc/net/tcp, or holds no byte for the client);
* ``disconnect``: a streamed SC request abandoned after a second (the server cancels it: 499 in its metrics; or 429
  at once, once the client has spent its starts);
* ``flood``: ``max_per_client`` + 4 slow bodies at once from one address (expect 408s and 429s).

Reported: the legitimate latency (median, p99: with fewer than 100 requests, the slowest) quiet vs hostile, every
status, each hostile kind's outcomes, how long the server held unread answers after their first byte, the server's
peak memory and CPU seconds per phase, and, at the end, that no branch, KV cell, run or queued request is left.
Targets (issue 16): hostile p99 <= 2x quiet; no 5xx; every hostile request a 4xx or a closed connection (an unread
stream: let go of); peak memory <= quiet peak + 200 MB; nothing left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import select
import socket
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from ponder.server.config import ServerConfig
from ponder.server.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository

LEGIT = "127.0.0.1"
LIMITS = ServerConfig()  # the server runs with its defaults: these are the limits it applies
EXPECTED = {"oversize": {"413"}, "huge_prompt": {"400", "429"}, "malformed": {"400"}, "slow_body": {"408"},
            "slow_headers": {"closed"}, "unread_stream": {"200 released", "429 released"},
            "disconnect": {"client closed", "429"}, "flood": {"408", "429"}}
UNREAD_ANSWER_WAIT_S = 300  # for an unread stream's answer to be decided (a greedy decode beside everything else)


@dataclass
class Run:
    port: int
    model: str
    pid: int
    args: argparse.Namespace
    unread_held_s: list[float] = field(default_factory=list)  # unread answers: first byte to the server letting go

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def body(self, content: str, *, model: str | None = None, **fields) -> bytes:
        message = {"role": "user", "content": content}
        return json.dumps({"model": model or f"sc-{self.args.n}/{self.model}", "messages": [message],
                           "max_tokens": self.args.max_tokens, **fields}).encode()


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0


# ---- raw HTTP, for clients that misbehave ----------------------------------------------------------------------------

def head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def connect(run: Run, source: str, *, receive_buffer: int | None = None):
    sock = socket.socket()
    if receive_buffer:  # set before connecting, so that the window the client advertises stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", run.port))
    return await asyncio.open_connection(sock=sock)


async def status_of(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    return line.split()[1].decode() if line else "closed"


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


async def send_and_read_status(run: Run, source: str, data: bytes) -> str:
    reader, writer = await connect(run, source)
    try:
        writer.write(data)
        return await status_of(reader)
    finally:
        writer.transport.abort()


# ---- hostile kinds: each returns its outcomes -------------------------------------------------------------------

async def oversize(run: Run, source: str) -> list[str]:
    body = b"x" * (2 * LIMITS.max_body_bytes)  # not even JSON: its size alone must refuse it
    return [await send_and_read_status(run, source, head(len(body)) + body)]


async def huge_prompt(run: Run, source: str) -> list[str]:
    body = run.body("a " * ((LIMITS.max_body_bytes - 300) // 2))  # " a" is one token: half a million tokens
    return [await send_and_read_status(run, source, head(len(body)) + body)]


async def malformed(run: Run, source: str) -> list[str]:
    body = run.body(QUESTION_FOR_HOSTILE)[:-20]
    return [await send_and_read_status(run, source, head(len(body)) + body)]


async def slow_body(run: Run, source: str) -> list[str]:
    body = run.body(QUESTION_FOR_HOSTILE)
    reader, writer = await connect(run, source)
    try:
        writer.write(head(len(body)))
        answer = asyncio.ensure_future(status_of(reader))
        for byte in body:
            done, _ = await asyncio.wait({answer}, timeout=1.0)
            if done:
                break
            writer.write(bytes([byte]))
        return [await answer]
    finally:
        writer.transport.abort()


async def slow_headers(run: Run, source: str) -> list[str]:
    reader, writer = await connect(run, source)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
        closed = asyncio.ensure_future(read_to_close(reader))
        for _ in range(int(3 * LIMITS.header_timeout_s)):
            done, _ = await asyncio.wait({closed}, timeout=1.0)
            if done:
                return ["closed"]
            writer.write(b"X-Slow: yes\r\n")
        closed.cancel()
        return ["still open"]
    finally:
        writer.transport.abort()


async def unread_stream(run: Run, source: str) -> list[str]:
    # A plain socket: asyncio's stream reader would take up to 128 KiB from the kernel without being asked, which
    # is reading. This client takes nothing; it only watches, without reading, for the answer's first byte, and then
    # for the server to hold no byte for it any more.
    body = run.body(QUESTION_FOR_HOSTILE, model=f"greedy/{run.model}", stream=True,
                    max_tokens=run.args.unread_tokens)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: its window stays small
    sock.bind((source, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", run.port))
        await loop.sock_sendall(sock, head(len(body)) + body)
        answered_by = time.monotonic() + UNREAD_ANSWER_WAIT_S
        while not select.select([sock], [], [], 0)[0]:  # readable: the answer has begun (or the server closed)
            if time.monotonic() > answered_by:
                return [f"not answered in {UNREAD_ANSWER_WAIT_S} s"]
            await asyncio.sleep(0.25)
        first_byte = time.monotonic()
        status = sock.recv(12, socket.MSG_PEEK).split(b" ")[-1].decode() or "closed"  # "HTTP/1.1 200"
        client_port = sock.getsockname()[1]
        while server_holds(run.port, client_port):
            if time.monotonic() - first_byte > LIMITS.send_timeout_s + 30:
                return [f"{status} still held"]
            await asyncio.sleep(0.25)
        run.unread_held_s.append(time.monotonic() - first_byte)
        return [f"{status} released"]
    finally:
        sock.close()


def server_holds(server_port: int, client_port: int) -> bool:
    """Whether the server's end of the connection from ``client_port`` still has bytes queued for the client
    (unsent or unacknowledged, in any TCP state, its process's or the kernel's after a close); Linux's
    /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, remote, _, queues = line.split()[1:5]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                return int(queues.split(":")[0], 16) > 0
    return False


async def disconnect(run: Run, source: str) -> list[str]:
    body = run.body(QUESTION_FOR_HOSTILE, stream=True)
    reader, writer = await connect(run, source)
    try:
        writer.write(head(len(body)) + body)
        return [await asyncio.wait_for(status_of(reader), 1.0)]  # answered within the second: refused at once
    except asyncio.TimeoutError:
        return ["client closed"]
    finally:
        writer.transport.abort()


async def flood(run: Run, source: str) -> list[str]:
    return [outcome for outcomes in await asyncio.gather(*(slow_body(run, source)
                                                           for _ in range(LIMITS.max_per_client + 4)))
            for outcome in outcomes]


KINDS = {kind.__name__: kind for kind in (oversize, huge_prompt, malformed, slow_body, slow_headers, unread_stream,
                                          disconnect, flood)}
QUESTION_FOR_HOSTILE = "What is 12 + 30? Think step by step."


async def hostile_client(run: Run, kind: str, source: str, stop: asyncio.Event, phase: Phase) -> None:
    # Each operation ends within its own deadline, so the client stops soon after `stop` is set.
    deadline_s = 3 * max(LIMITS.header_timeout_s, LIMITS.body_timeout_s, LIMITS.send_timeout_s) + 30
    if kind == "unread_stream":
        deadline_s += UNREAD_ANSWER_WAIT_S
    while not stop.is_set():
        try:
            outcomes = await asyncio.wait_for(KINDS[kind](run, source), deadline_s)
        except asyncio.TimeoutError:
            outcomes = ["no answer"]
        except OSError as exc:
            outcomes = [type(exc).__name__]
        phase.outcomes[kind].update(outcomes)
        await asyncio.sleep(run.args.hostile_pause)


# ---- legitimate clients, and the server's own figures ------------------------------------------------------------

async def legit_client(run: Run, client: int, questions: list[str], phase: Phase) -> None:
    for i in range(run.args.requests):
        index = client * run.args.requests + i  # the same questions and seeds in every phase: the same work
        await legit_request(run, questions[index % len(questions)], seed=1000 + index, phase=phase)


async def legit_request(run: Run, question: str, *, seed: int, phase: Phase) -> None:
    transport = httpx.AsyncHTTPTransport(local_address=LEGIT)
    async with httpx.AsyncClient(transport=transport, timeout=600) as http:
        started = time.perf_counter()
        try:
            response = await http.post(f"{run.url}/v1/chat/completions", content=run.body(question, seed=seed),
                                       headers={"content-type": "application/json"})
            status = str(response.status_code)
        except httpx.TransportError as exc:
            status = type(exc).__name__
        phase.latencies.append(time.perf_counter() - started)
        phase.statuses[status] += 1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def sample_memory(run: Run, phase: Phase, stop: asyncio.Event) -> None:
    while not stop.is_set():
        phase.peak_rss_mb = max(phase.peak_rss_mb, rss_mb(run.pid))
        await asyncio.sleep(0.2)


def metrics(run: Run) -> dict[str, float]:
    text = httpx.get(f"{run.url}/metrics", timeout=30).text
    found = re.findall(r'^(ponder_\w+(?:\{status="\d+"\})?) (\S+)$', text, re.MULTILINE)
    return {name: float(value) for name, value in found}


async def phase(run: Run, hostile: bool, questions: list[str]) -> Phase:
    result, stop, legit_done = Phase(), asyncio.Event(), asyncio.Event()
    cpu_before = cpu_seconds(run.pid)
    memory = asyncio.ensure_future(sample_memory(run, result, legit_done))
    attackers = [asyncio.ensure_future(hostile_client(run, kind, f"127.0.0.{10 + i}", stop, result))
                 for i, kind in enumerate(KINDS)] if hostile else []
    await asyncio.gather(*(legit_client(run, c, questions, result) for c in range(run.args.clients)))
    stop.set()
    await asyncio.gather(*attackers)
    legit_done.set()
    await memory
    result.cpu_s = cpu_seconds(run.pid) - cpu_before
    return result


# ---- the run -------------------------------------------------------------------------------------------------------

def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def merge(phases: list[Phase]) -> Phase:
    total = Phase()
    for p in phases:
        total.latencies += p.latencies
        total.statuses += p.statuses
        for kind, outcomes in p.outcomes.items():
            total.outcomes[kind] += outcomes
        total.peak_rss_mb = max(total.peak_rss_mb, p.peak_rss_mb)
        total.cpu_s += p.cpu_s
    return total


async def measure(run: Run, questions: list[str]) -> dict:
    args = run.args
    print(f"server {run.url}, model {run.model}; {args.clients} clients x {args.requests} SC requests "
          f"(n={args.n}, max_tokens={args.max_tokens}) per phase, {args.rounds} rounds", flush=True)
    await legit_request(run, questions[0], seed=0, phase=Phase())  # warm up: first-request costs are not measured
    phases: dict[bool, list[Phase]] = {False: [], True: []}
    for r in range(args.rounds):
        for hostile in (False, True):
            done = await phase(run, hostile, questions)
            phases[hostile].append(done)
            print(f"  round {r + 1} {'hostile' if hostile else 'quiet  '}: median "
                  f"{statistics.median(done.latencies):.2f} s, slowest {max(done.latencies):.2f} s, peak RSS "
                  f"{done.peak_rss_mb:.0f} MB, server CPU {done.cpu_s:.1f} s", flush=True)
    quiet, hostile = merge(phases[False]), merge(phases[True])
    after = await settled(run)
    server_5xx = sum(v for k, v in metrics(run).items() if re.fullmatch(r'ponder_requests_total\{status="5\d\d"\}', k))
    return report(quiet, hostile, after, server_5xx, run.unread_held_s)


async def settled(run: Run, timeout_s: float = 60) -> dict[str, float]:
    """The server's live state once it is back to rest (or as it is after ``timeout_s``)."""
    names = ("live_branches", "kv_cells_used", "requests_running", "queue_length")
    deadline = time.monotonic() + timeout_s
    while True:
        now = metrics(run)
        state = {name: now[f"ponder_{name}"] for name in names}
        if not any(state.values()) or time.monotonic() > deadline:
            return state | {"client_closed_499": now.get('ponder_requests_total{status="499"}', 0)}
        await asyncio.sleep(0.5)


def report(quiet: Phase, hostile: Phase, after: dict, server_5xx: float, unread_held_s: list[float]) -> dict:
    ratio = p99(hostile.latencies) / p99(quiet.latencies)
    legit_failed = sum(n for status, n in (quiet.statuses + hostile.statuses).items() if status != "200")
    unexpected = {kind: {o: n for o, n in outcomes.items() if o not in EXPECTED[kind]}
                  for kind, outcomes in hostile.outcomes.items()}
    unexpected = {kind: found for kind, found in unexpected.items() if found}
    growth = hostile.peak_rss_mb - quiet.peak_rss_mb
    left = {k: v for k, v in after.items() if k != "client_closed_499" and v}
    targets = {"p99 <= 2x quiet": ratio <= 2, "no 5xx": server_5xx == 0,
               "every legitimate request answered 200": legit_failed == 0,
               "every hostile request a 4xx or closed": not unexpected, "peak memory <= quiet + 200 MB": growth <= 200,
               "nothing left": not left}
    print(f"\nlegitimate latency   quiet: median {statistics.median(quiet.latencies):.2f} s, p99 "
          f"{p99(quiet.latencies):.2f} s ({len(quiet.latencies)} requests)\n"
          f"                   hostile: median {statistics.median(hostile.latencies):.2f} s, p99 "
          f"{p99(hostile.latencies):.2f} s ({len(hostile.latencies)} requests) -> p99 {ratio:.2f}x")
    print(f"legitimate statuses: quiet {dict(quiet.statuses)}, hostile {dict(hostile.statuses)}; server 5xx "
          f"{server_5xx:.0f}")
    for kind, outcomes in hostile.outcomes.items():
        print(f"  {kind:14s} {dict(outcomes)}")
    if unread_held_s:
        print(f"unread answers held after their first byte: at most {max(unread_held_s):.1f} s (send timeout "
              f"{LIMITS.send_timeout_s:g} s; {len(unread_held_s)} streams)")
    print(f"server peak RSS: quiet {quiet.peak_rss_mb:.0f} MB, hostile {hostile.peak_rss_mb:.0f} MB ({growth:+.0f}); "
          f"CPU s: quiet {quiet.cpu_s:.1f}, hostile {hostile.cpu_s:.1f}")
    print(f"after: {after}")
    for name, met in targets.items():
        print(f"  {'met    ' if met else 'MISSED '} {name}")
    return {"quiet": summary(quiet), "hostile": summary(hostile), "p99_ratio": round(ratio, 3),
            "server_5xx": server_5xx, "unexpected_outcomes": unexpected,
            "unread_held_s_max": round(max(unread_held_s), 1) if unread_held_s else None, "after": after,
            "targets": targets}


def summary(p: Phase) -> dict:
    return {"median_s": round(statistics.median(p.latencies), 3), "p99_s": round(p99(p.latencies), 3),
            "requests": len(p.latencies), "statuses": dict(sorted(p.statuses.items())),
            "hostile_outcomes": {kind: dict(o) for kind, o in p.outcomes.items()},
            "peak_rss_mb": round(p.peak_rss_mb, 1), "server_cpu_s": round(p.cpu_s, 1)}


def start_server(args: argparse.Namespace) -> ServerProcess:
    port = free_port()
    if args.fake:
        command = [sys.executable, "-m", __spec__.name, "--serve-fake", str(port)]
    else:
        command = [sys.executable, "-m", "ponder.cli", "serve", "--port", str(port)]
        command += ["--model", args.model] if args.model else []
    return ServerProcess(command, port, timeout_s=180, env={**os.environ, "PONDER_API_KEY": ""}, cwd=str(ROOT))


def serve_fake(port: int) -> None:
    """`ponder serve` as it would run on the fake engine, each token paced like a small model's decode step."""
    from ponder.engine.fake import FakeEngine, fake_tokens
    from ponder.server.app import create_app
    from ponder.server.guards import uvicorn_server

    class PacedFakeEngine(FakeEngine):
        n_ctx = 32768  # with a tokenizer: the server checks prompts against the context, as for the real engine
        tokenize = staticmethod(fake_tokens)

        async def extend(self, branch, params, stop_if=None):
            for _ in range(params.max_tokens):
                await super().extend(branch, replace(params, max_tokens=1), stop_if)
                if branch.finish_reason != "length":
                    return branch
                await asyncio.sleep(0.02)
            return branch

    engine = PacedFakeEngine(["Step " * 60 + "so it is \\boxed{42}"], kv_cells=32768)
    uvicorn_server(create_app(engine, LIMITS), LIMITS, host="127.0.0.1", port=port, log_level="warning").run()


async def main(args: argparse.Namespace) -> int:
    with open(args.data) as f:
        questions = [json.loads(line)["question"] for line, _ in zip(f, range(64))]
    with start_server(args) as server:
        model = httpx.get(f"{server.url}/health").json()["model"]
        run = Run(port=int(server.url.rsplit(":", 1)[1]), model=model, pid=server.process.pid, args=args)
        try:
            figures = await asyncio.wait_for(measure(run, questions), args.deadline_s)
        except asyncio.TimeoutError:
            print(f"stopped: the run took longer than --deadline-s {args.deadline_s:g}", file=sys.stderr)
            return 2
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), **figures}, indent=2) + "\n")
        print(f"\nfigures written to {args.out}")
    return 0 if all(figures["targets"].values()) else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model of the started server (default: the bundled 0.5B)")
    parser.add_argument("--fake", action="store_true", help="serve the fake engine instead: checks the harness only")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k_dev.jsonl")
    parser.add_argument("--clients", type=int, default=2, help="legitimate clients (default: 2)")
    parser.add_argument("--requests", type=int, default=6, help="requests per legitimate client per phase (default: 6)")
    parser.add_argument("--rounds", type=int, default=2, help="quiet/hostile rounds (default: 2)")
    parser.add_argument("--n", type=int, default=4, help="SC branches per legitimate request (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per branch (default: 96)")
    parser.add_argument("--unread-tokens", type=int, default=256,
                        help="tokens of the greedy answer an unread stream asks for (default: 256)")
    parser.add_argument("--hostile-pause", type=float, default=0.2,
                        help="seconds each hostile client waits between operations (default: 0.2)")
    parser.add_argument("--deadline-s", type=float, default=3600, help="stop the whole run after this (default: 3600)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the --fake server
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve_fake:
        serve_fake(arguments.serve_fake)
        sys.exit(0)
    sys.exit(asyncio.run(main(arguments)))
