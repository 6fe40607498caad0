"""What the program sandbox (ponder/programs/sandbox.py) costs per program, against a plain ``python -I`` subprocess.

    python -m benchmarks.performance.bench_sandbox                 # -> median and p90 wall ms per program, side by side
    python -m benchmarks.performance.bench_sandbox --runs 30 --out benchmarks/results/performance/sandbox.json
    python -m benchmarks.performance.bench_sandbox --rev 1ec433c   # also the sandbox as it was at a git revision

Two programs: a trivial one (``print(1)``) and a typical GSM8K-style program (a few lines of arithmetic). Each runs
``--runs`` times through ``run_python`` (bubblewrap: namespaces, mounts, seccomp, rlimits; output in files) and as
a plain subprocess of the same interpreter with its output piped, in turn so that drift on this noisy machine hits
all alike: ``python -I``, and ``python -I -S`` (the sandbox's own flags: no site module, whose ``.pth`` files cost
startup time) -- the difference to the latter is what bubblewrap itself costs. The first sandbox call of a process
also probes bwrap (once): it is timed apart.
``--rev`` adds the sandbox as it was at a git revision as one more way, so a change is measured side by side.
Target (issues 12 and 35): a median of 150 ms or less per program in the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.robustness.bench_sandbox_hostile import sandbox_at
from ponder.programs.sandbox import INTERPRETER, run_python

PROGRAMS = {
    "trivial": "print(1)",
    "gsm8k": ("eggs_per_day = 16\neaten = 3\nbaked = 4\nprice = 2\n"
              "remaining = eggs_per_day - eaten - baked\nprint(remaining * price)"),
}


async def sandboxed(code: str, run=run_python) -> str:
    outcome = await run(code)
    assert outcome.ok, outcome.stderr
    return outcome.stdout


async def plain_python(code: str, *flags: str) -> str:
    proc = await asyncio.create_subprocess_exec(INTERPRETER, *flags, "-c", code, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, _ = await proc.communicate()
    return stdout.decode()


RUNNERS = {
    "sandbox": sandboxed,
    "python -I": lambda code: plain_python(code, "-I"),
    "python -I -S": lambda code: plain_python(code, "-I", "-S"),
}


async def timed(run, code: str) -> float:
    start = time.perf_counter()
    await run(code)
    return (time.perf_counter() - start) * 1000


def summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 1), "p90_ms": round(statistics.quantiles(ms, n=10)[-1], 1)}


async def measure(runs: int) -> dict:
    figures = {"first_call_ms": round(await timed(sandboxed, "print(1)"), 1)}  # includes the one probe of bwrap
    for name, code in PROGRAMS.items():
        assert len({await run(code) for run in RUNNERS.values()}) == 1  # all print the same
        times: dict[str, list[float]] = {kind: [] for kind in RUNNERS}
        for _ in range(runs):
            for kind, run in RUNNERS.items():
                times[kind].append(await timed(run, code))
        figures[name] = {kind: summary(ms) for kind, ms in times.items()}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each program each way (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--rev", default=None, help="also time the sandbox as it was at this git revision")
    args = parser.parse_args()
    if args.rev:
        run_at_rev = sandbox_at(args.rev).run_python
        RUNNERS[f"sandbox@{args.rev}"] = lambda code: sandboxed(code, run_at_rev)
    figures = asyncio.run(measure(args.runs))
    print(f"first sandbox call of the process (probes bwrap): {figures['first_call_ms']:.0f} ms")
    print("median / p90 wall ms per program")
    print(f"{'program':<10}" + "".join(f"{kind:>16}" for kind in RUNNERS))
    for name in PROGRAMS:
        cells = (f"{figures[name][kind]['median_ms']:.0f} / {figures[name][kind]['p90_ms']:.0f}" for kind in RUNNERS)
        print(f"{name:<10}" + "".join(f"{cell:>16}" for cell in cells))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": args.runs, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
