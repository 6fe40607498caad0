"""bench_peers' verdict on the issue's target: ponder against each peer of the same method, on the problems both ran,
with completion tokens from the proxy (or ponder's own usage for an in-process run)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from benchmarks.peers.bench_peers import render_table, render_targets, systems_with_results


def write(out_dir: Path, system: str, rows: list[dict], config: dict | None = None) -> None:
    lines = [{"system": system, "config": config or {}, "versions": {system.split("-")[0]: "1.0"}}, *rows]
    (out_dir / f"{system}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def by_id(*rows: dict) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def row(problem: str, correct: bool, wall_s: float, completion: int, *, local: bool = False) -> dict:
    upstream = None if local else {"requests": 5, "prompt_tokens": 100, "completion_tokens": completion}
    reported = {"completion_tokens": completion if local else 0}
    return {"id": problem, "correct": correct, "wall_s": wall_s, "upstream": upstream, "reported": reported,
            "error": None}


def target_rows(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ponder-")]
    return {(c[0], c[1]): c[2:] for c in cells}


def test_a_faster_cheaper_equally_right_ponder_meets_the_target(tmp_path):
    write(tmp_path, "optillm-sc", [row("a", True, 40, 1000), row("b", False, 40, 1000)])
    write(tmp_path, "ponder-sc-local", [row("a", True, 10, 400, local=True), row("b", False, 10, 400, local=True)])
    problems = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]
    config = {"data": "gsm8k", "model": "qwen2.5-0.5b", "n": 4, "temperature": 0.7, "max_tokens": 512,
              "sampler": "default"}
    table = render_table(tmp_path, ["optillm-sc", "ponder-sc-local"], config, problems)  # read from the files
    assert "| optillm-sc | 1/2 | 50.0%" in table and "versions: optillm 1.0, ponder 1.0" in table
    assert target_rows(table.splitlines())[("ponder-sc-local", "optillm-sc")] == ["2", "+0.0", "0.25", "0.40", "met"]


def test_misses_are_named_and_only_shared_problems_count():
    # ponder ran one more problem than the peer: it must not enter the comparison.
    table = target_rows(render_targets({
        "its_hub-sc": by_id(row("a", True, 40, 1000), row("b", True, 40, 1000)),
        "ponder-sc": by_id(row("a", False, 40, 1000), row("b", True, 30, 500), row("c", True, 1, 1))}))
    assert table[("ponder-sc", "its_hub-sc")] == ["2", "-50.0", "0.88", "0.75", "missed: accuracy, wall, tokens"]


def test_different_methods_are_not_compared():
    results = {"optillm-bon": by_id(row("a", True, 40, 1000)), "ponder-sc": by_id(row("a", True, 1, 1))}
    assert target_rows(render_targets(results)) == {}


def test_the_adaptive_policy_is_held_against_every_peer():
    results = {"its_hub-sc": by_id(row("a", True, 40, 1000)), "optillm-bon": by_id(row("a", False, 40, 2000)),
               "ponder-auto": by_id(row("a", True, 10, 400))}
    table = target_rows(render_targets(results))
    assert table[("ponder-auto", "its_hub-sc")] == ["1", "+0.0", "0.25", "0.40", "met"]
    assert table[("ponder-auto", "optillm-bon")] == ["1", "+100.0", "0.25", "0.20", "met"]


def test_the_table_keeps_every_system_run_under_the_same_settings(tmp_path):
    # A later command that runs one system rewrites table.md: the systems run before it stay in it, a file written
    # with other settings stays out, and the rows come in the registry's order.
    write(tmp_path, "ponder-sc", [row("a", True, 30, 900)])
    write(tmp_path, "its_hub-sc", [row("a", True, 40, 1000)])
    write(tmp_path, "optillm-sc", [row("a", True, 40, 1000)], config={"n": 3})
    (tmp_path / "ponder-bon.jsonl").write_text("")  # cut off before its header
    assert systems_with_results(tmp_path, {}) == ["its_hub-sc", "ponder-sc"]
