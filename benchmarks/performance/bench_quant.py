"""What bounds batched decode on this CPU, by weight format: the shipped Q4_K_M against the same weights re-encoded
by llama.cpp's own quantizer (Q8_0 and Q4_0 have repacked CPU kernels), for speed *and* answer quality.

    python -m benchmarks.performance.bench_quant                                   # speed only, the 0.5B
    python -m benchmarks.performance.bench_quant --quality 100 --out benchmarks/results/performance/quant.json

Speed: the raw loop of ``bench_kv.py`` (one prefill, copy the KV to N sequences, one ``llama_decode`` per step for
all N, no sampling) for every format at N = 1 and N = 16, one format after the other in one run, so the ratios are
side by side. Quality (``--quality K``): ``ponder bench --strategy greedy`` on the first K GSM8K dev problems for each
format (``benchmarks/results/performance/quant/MODEL-greedy-FORMAT.jsonl``, resumable), then the accuracy and how
often each format's greedy answer equals the shipped format's.

Re-encoding starts from the shipped Q4_K_M (``allow_requantize``): it cannot bring back precision the shipped file
lost, it only changes the layout the CPU kernels read. The files are ponder's derived models (``ponder.models``:
``--model qwen2.5-0.5b-q4_0`` and so on), made once into ``$PONDER_HOME/models/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp as llama

from benchmarks.performance.bench_kv import mean_rate

from ponder.engine.llamacpp.vocabulary import quiet_llama_log
from ponder.models import DERIVED, DERIVED_TYPES, derive, derived_record, resolve_model

ROOT = Path(__file__).resolve().parents[2]  # the repository

SHIPPED = "q4_k_m"  # the format the bundled models ship in


def derived(model: str, name: str) -> tuple[Path, float]:
    """``model`` re-encoded as ``name``: ponder's derived model (made once, as ``--model MODEL-NAME`` makes it), and
    the seconds the making took (0 if it already existed)."""
    derived_model = DERIVED[f"{model}-{name}"]
    made_before = derived_record(derived_model) is not None
    started = time.perf_counter()
    path, _ = derive(derived_model)
    return path, 0.0 if made_before else time.perf_counter() - started


def speed(path: Path, *, n: int, steps: int, threads: int) -> float:
    """Aggregate decode tok/s of ``n`` sequences over ``steps`` steps (the mean of bench_kv's 100-step blocks)."""
    model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
    try:
        return mean_rate(model, n=n, steps=steps, threads=threads)
    finally:
        llama.llama_model_free(model)


def quality(model: str, formats: list[str], limit: int, out_dir: Path) -> dict[str, dict]:
    """Greedy GSM8K dev runs through ``ponder bench`` (resumable files), then accuracy and agreement with the shipped
    format's answers. The shipped format runs under its bundled name, so its file is the same as any greedy run of
    the bundled model with these settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answers: dict[str, dict[str, tuple[str | None, bool]]] = {}
    for name in formats:
        out = out_dir / f"{model}-greedy-{name}.jsonl"
        subprocess.run([str(Path(sys.executable).with_name("ponder")), "bench", "--data", "gsm8k", "--limit", str(limit),
                        "--strategy", "greedy", "--max-tokens", "512", "--seed", "0",
                        "--model", model if name == SHIPPED else f"{model}-{name}",
                        "--out", str(out)], check=True)
        rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]
        answers[name] = {row["id"]: (row.get("prediction"), bool(row.get("correct"))) for row in rows}
    reference = answers[SHIPPED]
    report = {}
    for name, found in answers.items():
        common = [i for i in found if i in reference]
        report[name] = {"problems": len(found),
                        "accuracy": sum(correct for _, correct in found.values()) / len(found),
                        "same_answer_as_shipped": sum(found[i][0] == reference[i][0] for i in common) / len(common)}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a bundled model (its shipped Q4_K_M is the source)")
    parser.add_argument("--formats", default="q8_0,q4_0", help=f"re-encodings to compare: {', '.join(DERIVED_TYPES)}")
    parser.add_argument("--batch", default="1,16", help="sequences decoding together, comma-separated (default 1,16)")
    parser.add_argument("--steps", type=int, default=200, help="decode steps, a multiple of 100 (default 200)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quality", type=int, default=0, metavar="K",
                        help="also run greedy on the first K GSM8K dev problems per format (default 0: speed only)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    names = [name.strip() for name in args.formats.split(",") if name.strip()]
    unknown = [name for name in names if name not in DERIVED_TYPES]
    if unknown:
        parser.error(f"unknown format {unknown[0]!r}; choose from {', '.join(DERIVED_TYPES)}")
    batches = [int(n) for n in args.batch.split(",")]
    if args.steps % 100 or args.steps > 900 or not all(1 <= n <= 64 for n in batches):
        parser.error("need --steps a multiple of 100 up to 900 and batch sizes in 1..64")
    quiet_llama_log()  # llama.cpp logs every tensor it quantizes and KV copy (shown with PONDER_VERBOSE set)

    llama.llama_backend_init()
    shipped = Path(resolve_model(args.model).path)
    formats = {SHIPPED: shipped}
    made = {}
    for name in names:
        formats[name], made[name] = derived(args.model, name)
    sizes = {name: path.stat().st_size for name, path in formats.items()}
    rates = {name: {n: speed(path, n=n, steps=args.steps, threads=args.threads) for n in batches}
             for name, path in formats.items()}

    base = rates[SHIPPED]
    print(f"{args.model}, {args.threads} threads, aggregate decode tok/s ({args.steps} steps after a 100-token prompt)")
    print(f"{'format':>18s}{'MB':>7s}" + "".join(f"{'N=' + str(n):>10s}{'vs shipped':>12s}" for n in batches)
          + f"{'N=' + str(batches[-1]) + ' / N=' + str(batches[0]):>14s}")
    for name, by_n in rates.items():
        print(f"{name:>18s}{sizes[name] / 1e6:7.0f}"
              + "".join(f"{by_n[n]:10.1f}{by_n[n] / base[n]:11.2f}x" for n in batches)
              + f"{by_n[batches[-1]] / by_n[batches[0]]:13.2f}x")
    report = {"command": " ".join(sys.argv), "model": args.model, "threads": args.threads, "steps": args.steps,
              "megabytes": {k: v / 1e6 for k, v in sizes.items()}, "quantize_seconds": made,
              "tok_s": {name: {str(n): r for n, r in by_n.items()} for name, by_n in rates.items()}}
    if args.quality:
        report["quality"] = quality(args.model, list(formats), args.quality,
                                    ROOT / "benchmarks" / "results" / "performance" / "quant")
        print(f"greedy on GSM8K dev, first {args.quality}:")
        for name, figures in report["quality"].items():
            print(f"{name:>18s}  accuracy {figures['accuracy']:.1%}  same answer as shipped "
                  f"{figures['same_answer_as_shipped']:.1%}  ({figures['problems']} problems)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
