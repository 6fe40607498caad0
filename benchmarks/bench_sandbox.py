"""What the program sandbox (ponder/sandbox.py) costs per program, against a plain ``python -I`` subprocess.

    python benchmarks/bench_sandbox.py                 # -> median and p90 wall ms per program, side by side
    python benchmarks/bench_sandbox.py --runs 30 --out benchmarks/results/sandbox.json

Two programs: a trivial one (``print(1)``) and a typical GSM8K-style program (a few lines of arithmetic). Each runs
``--runs`` times through ``run_python`` (bubblewrap: namespaces, mounts, seccomp, rlimits; output in files) and as
a plain ``python -I`` subprocess of the same interpreter with its output piped, alternating so that drift on this
noisy machine hits both alike. The first sandbox call of a process also probes bwrap (once): it is timed apart.
Target (issue 12): a median of 150 ms or less per program in the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from ponder.sandbox import INTERPRETER, run_python

PROGRAMS = {
    "trivial": "print(1)",
    "gsm8k": ("eggs_per_day = 16\neaten = 3\nbaked = 4\nprice = 2\n"
              "remaining = eggs_per_day - eaten - baked\nprint(remaining * price)"),
}


async def plain_python(code: str) -> str:
    proc = await asyncio.create_subprocess_exec(INTERPRETER, "-I", "-c", code, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, _ = await proc.communicate()
    return stdout.decode()


async def sandboxed(code: str) -> str:
    outcome = await run_python(code)
    assert outcome.ok, outcome.stderr
    return outcome.stdout


async def timed(run, code: str) -> float:
    start = time.perf_counter()
    await run(code)
    return (time.perf_counter() - start) * 1000


def summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 1), "p90_ms": round(statistics.quantiles(ms, n=10)[-1], 1)}


async def measure(runs: int) -> dict:
    figures = {"first_call_ms": round(await timed(sandboxed, "print(1)"), 1)}  # includes the one probe of bwrap
    for name, code in PROGRAMS.items():
        assert await sandboxed(code) == await plain_python(code)
        times: dict[str, list[float]] = {"sandbox": [], "plain": []}
        for _ in range(runs):
            times["sandbox"].append(await timed(sandboxed, code))
            times["plain"].append(await timed(plain_python, code))
        figures[name] = {kind: summary(ms) for kind, ms in times.items()}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each program each way (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.runs))
    print(f"first sandbox call of the process (probes bwrap): {figures['first_call_ms']:.0f} ms")
    print(f"{'program':<10}{'sandbox median':>16}{'p90':>8}{'plain median':>14}{'p90':>8}{'overhead':>10}")
    for name in PROGRAMS:
        box, plain = figures[name]["sandbox"], figures[name]["plain"]
        print(f"{name:<10}{box['median_ms']:>13.0f} ms{box['p90_ms']:>5.0f} ms{plain['median_ms']:>11.0f} ms"
              f"{plain['p90_ms']:>5.0f} ms{box['median_ms'] - plain['median_ms']:>7.0f} ms")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": args.runs, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
