"""Which llama.cpp build to run: raw speed of several builds of llama-cpp-python, side by side in one run.

Each build is a wheel of the same llama-cpp-python version compiled with other ``CMAKE_ARGS`` (built here once, into
``--work-dir``, unless a wheel is already there), installed into a virtualenv of its own. ``raw_decode.py`` then
measures each (build, extra weight buffers on/off) configuration on the bundled models, round-robin, so that every
configuration sees the same machine: prefill tok/s, decode tok/s of one branch and of 16 branches decoded together.
A configuration that dies (SIGILL) is reported as such. Ratios are to the portable AVX2 build with its extra buffers.

    python -m benchmarks.performance.bench_builds --work-dir /tmp/ponder-builds [--rounds 2] [--steps 64]
        [--models qwen2.5-0.5b qwen2.5-1.5b] [--out benchmarks/results/performance/builds.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ponder.models import resolve_model

VERSION = "0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILDS = {  # name -> CMAKE_ARGS
    "native": "",  # what `pip install llama-cpp-python` compiles: -march=native
    "portable": "-DGGML_NATIVE=OFF",  # any x86-64 with AVX2, FMA, F16C
    "native-no-amx": f'-DCMAKE_C_FLAGS="{NO_AMX}" -DCMAKE_CXX_FLAGS="{NO_AMX}"',
}
CONFIGS = [  # (build, extra weight buffers: AMX and repacked layouts)
    ("native", True), ("native", False), ("portable", True), ("portable", False), ("native-no-amx", True),
]
BASELINE = ("portable", True)
RAW_DECODE = Path(__file__).with_name("raw_decode.py")  # run by path: the build venvs have no ponder


def build(work_dir: Path, name: str) -> tuple[Path, float | None]:
    """The virtualenv holding build ``name``, compiling the wheel first if there is none; and the compile seconds."""
    wheels = work_dir / name / "wheel"
    venv = work_dir / name / "venv"
    compile_s = None
    if not list(wheels.glob("*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"compiling llama-cpp-python {VERSION} ({name}: CMAKE_ARGS={BUILDS[name]!r})…", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
                        "--no-binary", "llama-cpp-python", "-w", str(wheels), f"llama-cpp-python=={VERSION}"],
                       env=dict(os.environ, CMAKE_ARGS=BUILDS[name]), check=True)
        compile_s = round(time.perf_counter() - start, 1)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "numpy", "typing-extensions", "diskcache",
                        "jinja2", *map(str, wheels.glob("*.whl"))], check=True)
    return venv / "bin" / "python", compile_s


def run(python: Path, model: str, extra_buffers: bool, steps: int, threads: int) -> dict:
    command = [str(python), str(RAW_DECODE), model, "--n", "1", "16", "--steps", str(steps), "--threads", str(threads)]
    if not extra_buffers:
        command.append("--no-extra-buffers")
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode < 0:
        return {"died": f"signal {-proc.returncode}" + (" (SIGILL)" if proc.returncode == -4 else "")}
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="wheels and virtualenvs of the builds")
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"])
    parser.add_argument("--rounds", type=int, default=2, help="round-robin passes over all configurations")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "results" / "performance" / "builds.json")
    args = parser.parse_args()

    pythons, compile_s = {}, {}
    for name in BUILDS:
        pythons[name], compile_s[name] = build(args.work_dir, name)
    rows = []
    for model in args.models:
        path = resolve_model(model).path
        samples: dict[tuple[str, bool], list[dict]] = {config: [] for config in CONFIGS}
        for round_ in range(args.rounds):
            for config in CONFIGS:
                print(f"{model} round {round_ + 1}: {config[0]}, extra buffers {'on' if config[1] else 'off'}",
                      flush=True)
                samples[config].append(run(pythons[config[0]], path, config[1], args.steps, args.threads))
        base = samples[BASELINE]
        for (name, extra), runs in samples.items():
            row = {"model": model, "build": name, "extra_buffers": extra}
            if any("died" in r for r in runs):
                row["died"] = next(r["died"] for r in runs if "died" in r)
            else:
                row["prefill_tok_s"] = mean([r["prefill_tok_s"] for r in runs])
                for n in ("1", "16"):
                    row[f"decode_n{n}_tok_s"] = mean([r["decode_tok_s"][n] for r in runs])
                    row[f"decode_n{n}_vs_portable"] = round(
                        row[f"decode_n{n}_tok_s"] / mean([r["decode_tok_s"][n] for r in base]), 2)
                row["prefill_vs_portable"] = round(row["prefill_tok_s"] / mean([r["prefill_tok_s"] for r in base]), 2)
            rows.append(row)

    print("\n| model | build | extra buffers | prefill tok/s | N=1 tok/s | N=16 tok/s | vs portable (prefill, N=1, "
          "N=16) |\n|---|---|---|---:|---:|---:|---|")
    for r in rows:
        head = f"| {r['model']} | {r['build']} | {'on' if r['extra_buffers'] else 'off'} |"
        if "died" in r:
            print(f"{head} died: {r['died']} | | | |")
        else:
            print(f"{head} {r['prefill_tok_s']} | {r['decode_n1_tok_s']} | {r['decode_n16_tok_s']} | "
                  f"{r['prefill_vs_portable']}, {r['decode_n1_vs_portable']}, {r['decode_n16_vs_portable']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "llama_cpp_python": VERSION, "builds": BUILDS, "compile_s": compile_s, "steps": args.steps,
        "rounds": args.rounds, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
