"""llama.cpp's decode speed by thread count, on a quiet machine and while another process keeps one core busy.

    python -m benchmarks.performance.bench_threads
    python -m benchmarks.performance.bench_threads --threads 1,2,3 --out benchmarks/results/performance/threads.json

llama.cpp's CPU threads meet at a barrier after every operation of the graph, so one thread that loses its core to
another process holds all the others up: the whole decode slows to the pace of the thread that waits longest for a
core. This measures the raw loop of ``bench_kv.py`` (one prefill, copy the KV to N sequences, one ``llama_decode``
per step for all N) at each thread count, at N = 1 and N = 16, quiet and with a competitor (a Python process spinning
on one core, at normal priority or at ``nice 19``), one set-up after the other in one run, so the figures are side by
side. The engine's default thread count (``n_threads``) is chosen from these figures; see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import llama_cpp as llama

from benchmarks.performance.bench_kv import mean_rate

from ponder.models import resolve_model

COMPETITORS = {"quiet": None, "busy core": 0, "busy core, nice 19": 19}


@contextmanager
def competitor(niceness: int | None):
    """A process spinning on one core (at ``niceness``) for the duration, or nothing when ``niceness`` is None."""
    if niceness is None:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.nice({niceness})\nwhile True: pass"])
    time.sleep(0.5)  # let it start spinning
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--threads", default=None,
                        help="thread counts to compare, comma-separated (default: 1 up to the core count)")
    parser.add_argument("--batch", default="1,16", help="sequences decoding together, comma-separated (default 1,16)")
    parser.add_argument("--steps", type=int, default=100, help="decode steps, a multiple of 100 (default 100)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, cores + 1))
    batches = [int(n) for n in args.batch.split(",")]
    if args.steps % 100 or args.steps > 900 or not all(1 <= n <= 64 for n in batches) or min(thread_counts) < 1:
        parser.error("need --steps a multiple of 100 up to 900, batch sizes in 1..64 and thread counts >= 1")
    if os.environ.get("PONDER_VERBOSE") is None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # llama.cpp logs every KV copy to stderr

    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(resolve_model(args.model).path.encode(),
                                             llama.llama_model_default_params())
    rates: dict[str, dict[int, dict[int, float]]] = {}
    try:
        for setting, niceness in COMPETITORS.items():
            with competitor(niceness):
                rates[setting] = {threads: {n: mean_rate(model, n=n, steps=args.steps, threads=threads)
                                            for n in batches}
                                  for threads in thread_counts}
    finally:
        llama.llama_model_free(model)

    print(f"{args.model} on {cores} cores: aggregate decode tok/s (and the share kept of the quiet figure)")
    print(f"{'threads':>8s}" + "".join(f"{setting + ', N=' + str(n):>28s}" for setting in rates for n in batches))
    for threads in thread_counts:
        cells = []
        for setting in rates:
            for n in batches:
                rate = rates[setting][threads][n]
                kept = rate / rates["quiet"][threads][n]
                cells.append(f"{rate:20.1f}" + (f" ({kept:4.0%})" if setting != "quiet" else " " * 7))
        print(f"{threads:8d}" + "".join(cells))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "model": args.model, "cores": cores,
                                        "steps": args.steps,
                                        "tok_s": {setting: {str(t): {str(n): r for n, r in by_n.items()}
                                                            for t, by_n in by_t.items()}
                                                  for setting, by_t in rates.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
