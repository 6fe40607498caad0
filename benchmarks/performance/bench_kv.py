"""How llama.cpp's KV layout weighs on batched decoding as branches grow: one unified cache vs a stream per sequence.

    python -m benchmarks.performance.bench_kv       # -> prints tok/s by context length, both layouts side by side
    python -m benchmarks.performance.bench_kv --n 32 --steps 500 --out benchmarks/results/performance/kv.json

The engine keeps all branches in one *unified* KV cache so that forks share the prompt's cells. Attention then runs
over every used cell of the cache for every sequence (the others' cells are masked), so a decode step costs more as
the branches together hold more cells, and holes left by released branches count too (llama.cpp attends up to the
highest used cell). With ``kv_unified = false`` each sequence has its own stream of ``n_ctx / n_seq_max`` cells: a
fork copies the prompt's cells, and attention only sees the sequence's own. This measures the raw loop (one prefill,
copy the KV to N sequences, one ``llama_decode`` per step for all N, no sampling) in four set-ups, one after the
other in one run:

* ``unified``: a fresh unified cache;
* ``unified, holes``: the same after another sequence held ``--holes`` cells below the live ones and was released,
  the state of a long-running engine;
* ``holes, compacted``: the same holes, after the live sequence was copied out (``llama_state_seq_get_data``), the
  cache cleared and the sequence copied back in (``llama_state_seq_set_data``), which puts it in the lowest cells;
* ``per-sequence``: a stream per sequence.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import llama_cpp as llama

from ponder.models import resolve_model

PROMPT_TOKENS = 100
N_SEQ_MAX = 64


def compact(ctx, memory, seq: int) -> None:
    """Copy ``seq`` out, empty the cache, copy it back: llama.cpp places it in the lowest cells."""
    size = llama.llama_state_seq_get_size(ctx, seq)
    state = (ctypes.c_uint8 * size)()
    llama.llama_state_seq_get_data(ctx, state, size, seq)
    llama.llama_memory_clear(memory, False)
    if llama.llama_state_seq_set_data(ctx, state, size, seq) != size:
        raise RuntimeError("llama_state_seq_set_data failed")


def run(model, *, unified: bool, holes: int, n: int, steps: int, threads: int, compacted: bool = False) -> list[float]:
    """Aggregate tok/s of each block of 100 steps."""
    params = llama.llama_context_default_params()
    params.n_seq_max = N_SEQ_MAX
    params.kv_unified = unified
    # the same room per branch either way: 32768 cells shared, or 1024 per stream
    params.n_ctx = 32768 if unified else N_SEQ_MAX * 1024
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = threads
    ctx = llama.llama_init_from_model(model, params)
    memory = llama.llama_get_memory(ctx)
    batch = llama.llama_batch_init(512, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = (
                token, pos, 1, seq, logits)
        batch.n_tokens = len(items)
        if llama.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def fill(seq: int, count: int) -> None:
        for start in range(0, count, 512):
            decode([(100 + k % 1000, k, seq, False) for k in range(start, min(count, start + 512))])

    try:
        if holes:  # a long sequence below a short one, then released: the live cells sit above a hole
            fill(N_SEQ_MAX - 2, holes)
            fill(N_SEQ_MAX - 1, PROMPT_TOKENS)
            llama.llama_memory_seq_rm(memory, N_SEQ_MAX - 2, -1, -1)
            if compacted:
                compact(ctx, memory, N_SEQ_MAX - 1)
        fill(0, PROMPT_TOKENS)
        for seq in range(1, n):
            llama.llama_memory_seq_cp(memory, 0, seq, -1, -1)
        rates, started = [], time.perf_counter()
        for step in range(steps):
            decode([(200 + step % 1000, PROMPT_TOKENS + step, seq, True) for seq in range(n)])
            if (step + 1) % 100 == 0:
                now = time.perf_counter()
                rates.append(n * 100 / (now - started))
                started = now
        return rates
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)


def mean_rate(model, *, n: int, steps: int, threads: int) -> float:
    """Aggregate tok/s of ``n`` sequences over ``steps`` steps on a fresh unified cache (the mean of the 100-step
    blocks): the figure ``bench_threads.py`` and ``bench_quant.py`` compare."""
    rates = run(model, unified=True, holes=0, n=n, steps=steps, threads=threads)
    return sum(rates) / len(rates)


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--n", type=int, default=32, help="sequences decoding together (default 32)")
    parser.add_argument("--steps", type=int, default=500, help="decode steps, a multiple of 100 (default 500)")
    parser.add_argument("--holes", type=int, default=16384, help="cells released below the live ones (default 16384)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.n > N_SEQ_MAX or args.steps % 100 or args.steps + PROMPT_TOKENS > 1024:
        parser.error(f"need --n <= {N_SEQ_MAX} and --steps a multiple of 100 with at most {1024 - PROMPT_TOKENS}")
    if os.environ.get("PONDER_VERBOSE") is None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # llama.cpp logs every KV copy to stderr
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(resolve_model(args.model).path.encode(),
                                             llama.llama_model_default_params())
    setups = {"unified": (True, 0, False), "unified, holes": (True, args.holes, False),
              "holes, compacted": (True, args.holes, True), "per-sequence": (False, 0, False)}
    rates = {name: run(model, unified=u, holes=h, n=args.n, steps=args.steps, threads=args.threads, compacted=c)
             for name, (u, h, c) in setups.items()}
    print(f"{args.n} sequences, prompt {PROMPT_TOKENS} tokens, aggregate tok/s by context length of each sequence:")
    print(f"{'context':>12s}" + "".join(f"{name:>18s}" for name in rates))
    for block in range(args.steps // 100):
        span = f"{PROMPT_TOKENS + 100 * block}-{PROMPT_TOKENS + 100 * (block + 1)}"
        print(f"{span:>12s}" + "".join(f"{rates[name][block]:18.1f}" for name in rates))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "n": args.n, "holes": args.holes,
                                        "tok_s_per_100_steps": rates}, indent=2) + "\n")
    llama.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
