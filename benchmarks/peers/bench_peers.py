"""ponder side by side with optillm and its_hub: the same llama.cpp server, model, problems, prompt and sampling.

    python -m benchmarks.peers.bench_peers                          # GSM8K dev, first 50 problems, every system
    python -m benchmarks.peers.bench_peers --limit 2 --out-dir /tmp/peers-smoke   # a smoke run of the plumbing
    python -m benchmarks.peers.bench_peers --systems optillm-sc,ponder-sc --data math500 --limit 20
    python -m benchmarks.peers.bench_peers --server llama-server --model qwen2.5-1.5b --offset 200 --limit 20 \
        --systems its_hub-sc,ponder-sc,ponder-auto --out-dir benchmarks/results/peers/llama-server-1.5b

What runs:

1. A server with a bundled model (``--model``, default the 0.5B) on 127.0.0.1, 2 threads: llama-cpp-python's
   OpenAI-compatible server (``--n_ctx`` 8192, ``--interrupt_requests false``; it decodes one request at a time), or
   with ``--server llama-server`` llama.cpp's own (``benchmarks/testbed/llama_server.py``: 8 slots decoded together,
   continuous batching, prompt cache). In front of it the counting proxy (``peers/counting_proxy.py``): every
   system gets its own base URL on it, and every request it sends upstream is recorded with the server's own token
   counts. The proxy also gives every system the same sampler (top_p, top_k, min_p 0, repeat_penalty 1) and a server
   that honours ``n`` and ``max_completion_tokens`` (see its docstring).
2. The remote systems, one after the other (each peer in its own venv under ``peers/venvs/``, installed on first
   use): optillm ``self_consistency``, ``bon`` and the ``majority_voting`` plugin through optillm's proxy; its_hub
   ``SelfConsistency``, ``BestOfN`` and ``ParticleFiltering``; ponder ``sc``, ``adaptive``, ``bon``, ``particles``
   and ``auto`` (its shipped policy: ``n`` does not apply) on its remote engine (``--engine openai``).
3. The server is stopped, and the same ponder strategies run in process (the runs never share cores).

Every final answer is scored by ponder's checker (math-verify equivalence). Each system's rows go to
``OUT_DIR/SYSTEM.jsonl`` (a header with the settings and versions, then one row per problem), so a run that was
stopped resumes where it was; a file written with other settings is refused rather than mixed. The table of every
system with results in OUT_DIR under these settings (accuracy with its Wilson 95 % interval, upstream requests and
tokens per problem as the proxy counted them, the system's own reported usage, wall seconds per problem) is printed
and written to ``OUT_DIR/table.md``. It does not know when each file was written: compare wall times only between
runs made side by side.

Where the systems cannot be made alike, the table's notes say so: optillm's ``self_consistency`` always draws 5
samples at temperature 1 and groups whole texts by string similarity, its ``bon`` samples at temperature 1 and asks
the model for a 0-10 rating, its ``majority_voting`` plugin does not read ``\\boxed{}``, and optillm sends an empty
system message where the others send none (the model's default one applies).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from benchmarks.peers.counting_proxy import CountingProxy, Totals
from benchmarks.peers.runners import ItsHubRunner, OptillmRunner, PonderRunner, Settings, user_turn
from ponder.bench.datasets import load_dataset
from ponder.bench.metrics import wilson_interval
from ponder.models import CATALOG, resolve_model
from ponder.server.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository

N_CTX = 8192  # llama-cpp-python's server; llama-server gets SLOTS slots of SLOT_CTX tokens each
SLOTS, SLOT_CTX = 8, 2048
# system -> (family, method). Remote systems go through the server and the counting proxy; "local" ones run in
# process, once the server is stopped.
SYSTEMS = {
    "optillm-sc": ("optillm", "self_consistency"),
    "optillm-bon": ("optillm", "bon"),
    "optillm-majority": ("optillm", "majority_voting"),
    "its_hub-sc": ("its_hub", "sc"),
    "its_hub-bon": ("its_hub", "bon"),
    "its_hub-pf": ("its_hub", "pf"),
    "ponder-sc": ("ponder", "sc"),
    "ponder-adaptive": ("ponder", "adaptive"),
    "ponder-bon": ("ponder", "bon"),
    "ponder-particles": ("ponder", "particles"),
    "ponder-auto": ("ponder", "auto"),
    "ponder-sc-local": ("local", "sc"),
    "ponder-adaptive-local": ("local", "adaptive"),
    "ponder-bon-local": ("local", "bon"),
    "ponder-particles-local": ("local", "particles"),
    "ponder-auto-local": ("local", "auto"),
}
# method -> (the peers' systems, ponder's systems) that the issue's target compares.
MATCHES = {
    "self-consistency": (["optillm-sc", "optillm-majority", "its_hub-sc"],
                         ["ponder-sc", "ponder-adaptive", "ponder-sc-local", "ponder-adaptive-local"]),
    "best-of-n": (["optillm-bon", "its_hub-bon"], ["ponder-bon", "ponder-bon-local"]),
    "particle filtering": (["its_hub-pf"], ["ponder-particles", "ponder-particles-local"]),
    # ponder's adaptive policy is no peer method's twin: it is held against every peer.
    "adaptive policy": (["optillm-sc", "optillm-majority", "its_hub-sc", "optillm-bon", "its_hub-bon", "its_hub-pf"],
                        ["ponder-auto", "ponder-auto-local"]),
}
NOTES = {
    "optillm-sc": "optillm: always 5 samples at temperature 1, groups whole texts by string similarity",
    "optillm-bon": "optillm: samples at temperature 1, the model rates each 0-10 (rating tokens included)",
    "optillm-majority": "optillm plugin: votes on normalized whole texts or 'answer:' patterns, not \\boxed{}",
    "its_hub-bon": "its_hub's own usage leaves out the P(Yes) judge's requests; the proxy counts them",
    "its_hub-pf": "its_hub continues steps with vLLM's continue_final_message; llama-cpp-python starts a new turn",
    "ponder-bon": "llama-cpp-python 0.3 shifts echoed prompt logprobs by one token, so ponder's self-verifier reads "
                  "P(Yes) from one greedy token's top-20 alternatives there (one request per candidate, which also "
                  "counts the appended question)",
    "ponder-particles": "the same 0.5B judges its steps (P(Yes), its_hub-pf's reward); on llama-cpp-python's server "
                        "from the reply's first token, one request per scored step",
}


def main() -> int:
    args = parse_args()
    systems = [s.strip() for s in args.systems.split(",")] if args.systems else list(SYSTEMS)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    dataset = load_dataset(args.data)
    problems = dataset.select(offset=args.offset, limit=args.limit)
    settings = Settings(model=args.model, n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_tokens=args.max_tokens, max_steps=args.max_steps)
    sampler = {"top_p": args.top_p, "top_k": args.top_k, "min_p": 0.0, "repeat_penalty": 1.0}
    # Settings a results file must share to be resumed (the problem count may grow: rows are kept per problem).
    config = {"data": dataset.name, "data_sha256": dataset.sha256, **asdict(settings),
              "sampler": sampler, "prompt": user_turn("{question}"), "scoring": dataset.scoring}
    if args.server != "llama-cpp-python":  # only then, so that the folders written before the option still resume
        config["server"] = args.server
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(args.model).path

    remote = [s for s in systems if SYSTEMS[s][0] != "local" and pending(args.out_dir, s, problems, config)]
    if remote:
        with ExitStack() as stack:
            server = stack.enter_context(start_server(args.server, args.model, model_path))
            proxy = stack.enter_context(CountingProxy(server.url, sampler=sampler,
                                                      count_tokens=tokenizer(model_path)))
            for system in remote:
                family, method = SYSTEMS[system]
                base_url = proxy.base_url(system)
                runner = {"optillm": OptillmRunner, "its_hub": ItsHubRunner, "ponder": PonderRunner}[family]
                run_system(args.out_dir, system, runner(method, base_url, settings), problems, dataset, config,
                           proxy)
    for system in systems:
        if SYSTEMS[system][0] == "local" and pending(args.out_dir, system, problems, config):
            runner = PonderRunner(SYSTEMS[system][1], None, settings)
            run_system(args.out_dir, system, runner, problems, dataset, config, None)

    # Every system with results under these settings, not only this command's: a run of one system must not drop the
    # others from the directory's table.
    table = render_table(args.out_dir, systems_with_results(args.out_dir, config), config, problems)
    print(table)
    (args.out_dir / "table.md").write_text(table)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="gsm8k", help="dataset (default gsm8k: GSM8K dev)")
    parser.add_argument("--offset", type=int, default=0, help="skip the first N problems (default 0)")
    parser.add_argument("--limit", type=int, default=50, help="then run N problems (default 50)")
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(CATALOG),
                        help="the bundled model every system is served (default qwen2.5-0.5b)")
    parser.add_argument("--server", default="llama-cpp-python", choices=["llama-cpp-python", "llama-server"],
                        help="the server every remote system talks to (default llama-cpp-python, one request at a "
                             "time; llama-server batches its slots)")
    parser.add_argument("--systems", help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    parser.add_argument("--n", type=int, default=5,
                        help="samples, candidates or particles per problem (default 5: optillm's self_consistency "
                             "always draws 5)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=512, help="per generation request (default 512)")
    parser.add_argument("--max-steps", type=int, default=16, help="its_hub particle filtering: steps at most")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "peers")
    return parser.parse_args()


def start_server(server: str, model: str, model_path: str):
    """The server, started; ``.url`` is its root."""
    if server == "llama-server":
        from benchmarks.testbed.llama_server import LlamaServer, unavailable_reason

        if reason := unavailable_reason():
            raise SystemExit(reason)
        return LlamaServer(model, parallel=SLOTS, ctx_per_slot=SLOT_CTX, threads=2)
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--model_alias", model,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX), "--n_threads", "2",
               "--n_threads_batch", "2", "--interrupt_requests", "false"]
    return ServerProcess(command, port, ready_path="/v1/models", stop_timeout_s=15)


def tokenizer(model_path: str):
    """The served model's own tokenizer (vocabulary only), to count streams the server reports no usage for."""
    from llama_cpp import Llama

    vocab = Llama(model_path, vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=True))


# ---- one system's run, resumable -------------------------------------------------------------------------------

def results_path(out_dir: Path, system: str) -> Path:
    return out_dir / f"{system}.jsonl"


def read_results(out_dir: Path, system: str) -> tuple[dict | None, list[dict]]:
    path = results_path(out_dir, system)
    if not path.exists():
        return None, []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:  # stopped before its header was written
        return None, []
    return lines[0], lines[1:]


def pending(out_dir: Path, system: str, problems, config: dict) -> bool:
    """Whether ``system`` has problems left to run; a system that failed on every problem it tried has none."""
    header, rows = read_results(out_dir, system)
    if header is not None and header["config"] != config:
        raise SystemExit(f"{results_path(out_dir, system)} was written with other settings; move it away or use "
                         "another --out-dir")
    if rows and all(r["error"] for r in rows):
        print(f"{system}: skipped, it failed on every problem it tried ({rows[0]['error']})", flush=True)
        return False
    return not {p.id for p in problems} <= {r["id"] for r in rows}


def systems_with_results(out_dir: Path, config: dict) -> list[str]:
    """The systems (in ``SYSTEMS`` order) whose results file in ``out_dir`` was written with ``config``."""
    shown = []
    for system in SYSTEMS:
        header, _ = read_results(out_dir, system)
        if header is not None and header["config"] == config:
            shown.append(system)
    return shown


def run_system(out_dir: Path, system: str, runner, problems, dataset, config: dict,
               proxy: CountingProxy | None) -> None:
    """Run ``system`` on the problems its results file does not hold yet. A system whose first problem fails
    (ponder's ``bon`` refuses a server without usable prompt logprobs) is not run further: its failure is its row."""
    header, rows = read_results(out_dir, system)
    done = {r["id"] for r in rows}
    path = results_path(out_dir, system)
    print(f"{system}: {len(done & {p.id for p in problems})} of {len(problems)} problems done", flush=True)
    with runner, open(path, "a") as out:
        if header is None:
            out.write(json.dumps({"system": system, "config": config, "versions": runner.versions}) + "\n")
        for seed, problem in enumerate(problems, start=1):
            if problem.id in done:
                continue
            before = proxy.totals(system) if proxy else Totals()
            started = time.perf_counter()
            answer = runner.solve(problem.question, seed)
            wall_s = time.perf_counter() - started
            upstream = proxy.totals(system).minus(before) if proxy else None
            row = {"id": problem.id, "answer": answer.answer, "gold": problem.answer,
                   "correct": dataset.score(answer.answer, problem), "wall_s": round(wall_s, 3),
                   "upstream": asdict(upstream) if upstream else None, "reported": answer.reported,
                   "error": answer.error, "text": answer.text}
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"  {system} {problem.id}: {answer.answer!r} (gold {problem.answer!r}) "
                  f"{'ok' if row['correct'] else 'wrong'} {wall_s:.1f} s"
                  + (f" error: {answer.error}" if answer.error else ""), flush=True)
            if answer.error and not done:
                print(f"  {system} stops: its first problem failed", flush=True)
                return
            done.add(problem.id)


# ---- the table -------------------------------------------------------------------------------------------------

def render_table(out_dir: Path, systems: list[str], config: dict, problems) -> str:
    wanted = {p.id for p in problems}
    server = {"llama-server": "llama.cpp's llama-server"}.get(config.get("server"), "llama-cpp-python's server")
    lines = [f"{config['data']}, {len(problems)} problems, {config['model']} behind {server}, n={config['n']}, "
             f"temperature {config['temperature']}, max_tokens {config['max_tokens']}, sampler {config['sampler']}",
             "",
             "| system | solved | accuracy (95 % CI) | upstream requests / problem | prompt tok / problem | "
             "completion tok / problem | reported prompt tok / problem | reported completion tok / problem | "
             "wall s / problem | errors |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    versions, results = {}, {}
    for system in systems:
        header, rows = read_results(out_dir, system)
        rows = [r for r in rows if r["id"] in wanted]
        if not rows:
            continue
        versions.update(header["versions"])
        results[system] = {r["id"]: r for r in rows}
        count = len(rows)
        solved = sum(r["correct"] for r in rows)
        low, high = wilson_interval(solved, count)

        def mean(values) -> str:
            values = [v for v in values if v is not None]
            return f"{sum(values) / len(values):.1f}" if values else "-"

        upstream = [r["upstream"] for r in rows if r["upstream"]]
        lines.append(
            f"| {system} | {solved}/{count} | {solved / count:.1%} ({low:.1%}-{high:.1%}) | "
            f"{mean(u['requests'] for u in upstream)} | {mean(u['prompt_tokens'] for u in upstream)} | "
            f"{mean(u['completion_tokens'] for u in upstream)} | {mean(reported_prompt(r) for r in rows)} | "
            f"{mean(r['reported'].get('completion_tokens') for r in rows)} | {mean(r['wall_s'] for r in rows)} | "
            f"{sum(bool(r['error']) for r in rows)} |")
    lines += ["", *render_targets(results)]
    lines += ["", "In-process rows (`-local`) have no proxy: their counts are ponder's own usage (reported columns; "
              "ponder's reported prompt tokens include the tokens its verifier scored).",
              "A peer's final text is read as a finished one (its last number counts when it boxes none), since the "
              "peers do not say whether it was cut off; ponder does not count the last number of a cut-off branch.",
              *[f"- {system}: {note}" for system, note in NOTES.items() if system in systems],
              f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}", ""]
    return "\n".join(lines)


def render_targets(results: dict[str, dict[str, dict]]) -> list[str]:
    """The issue's target, pair by pair: ponder's accuracy at least the peer's, at no more than half its wall time and
    half its completion tokens, on the problems both have run. ``results``: each system's rows by problem id."""
    lines = ["Target per matching method: ponder's accuracy >= the peer's at <= 0.5x its wall time and <= 0.5x its "
             "completion tokens (on the problems both ran).",
             "",
             "| ponder | peer | problems | accuracy, ponder - peer (points) | wall ratio | completion tok ratio | "
             "target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for method, (peers, ours) in MATCHES.items():
        for mine in (s for s in ours if results.get(s)):
            for peer in (s for s in peers if results.get(s)):
                common = sorted(results[mine].keys() & results[peer].keys())
                if not common:
                    continue
                a = [results[mine][i] for i in common]
                b = [results[peer][i] for i in common]
                gain = 100 * (sum(r["correct"] for r in a) - sum(r["correct"] for r in b)) / len(common)
                wall = sum(r["wall_s"] for r in a) / sum(r["wall_s"] for r in b)
                tokens = sum(completion_tokens(r) for r in a) / max(1, sum(completion_tokens(r) for r in b))
                misses = [what for what, missed in (("accuracy", gain < 0), ("wall", wall > 0.5),
                                                    ("tokens", tokens > 0.5)) if missed]
                verdict = "met" if not misses else "missed: " + ", ".join(misses)
                lines.append(f"| {mine} | {peer} | {len(common)} | {gain:+.1f} | {wall:.2f} | {tokens:.2f} | "
                             f"{verdict} |")
    return lines


def completion_tokens(row: dict) -> int:
    """Completion tokens as the proxy counted them; an in-process run has no proxy, so its own usage."""
    if row["upstream"]:
        return row["upstream"]["completion_tokens"]
    return row["reported"].get("completion_tokens") or 0


def reported_prompt(row: dict) -> int | None:
    reported = row["reported"]
    if "prompt_tokens" not in reported:
        return None
    return reported["prompt_tokens"] + reported.get("scored_tokens", 0)


if __name__ == "__main__":
    sys.exit(main())
