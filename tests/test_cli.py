"""The command line: clear one-line errors and exit codes, and the JSON contract of `ponder ask --json`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from recording_engine import RecordingEngine

from ponder import options
from ponder.cli import main


@pytest.mark.parametrize("argv, message", [
    (["ask", "hi", "--model", "nope"], "unknown model 'nope'"),
    (["ask", "hi", "--temperature", "9"], "temperature must be between 0 and 5"),
    (["ask", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["ask", "   "], "the question is empty"),
    (["ask", "hi", "--strategy", "telepathy"], "unknown strategy 'telepathy'"),
    (["ask", "hi", "--option", "novalue"], "--option takes KEY=VALUE"),
    (["ask", "hi", "--engine", "openai"], "needs --base-url"),
    (["ask", "hi", "--chat-template", "chatml"], "--chat-template is for --engine openai"),
    (["ask", "hi", "--prompt-template", "missing.txt"], "--prompt-template missing.txt: no such file"),
    (["ask", "hi", "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", "--prefix-cache-tokens", "0"],
     "--prefix-cache-tokens is for the in-process engine"),
    (["ask", "hi", "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", "--threads", "1"],
     "--threads is for the in-process engine"),
    (["bench", "--data", "gsm8k", "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", "--chat-template",
      "missing.jinja", "--out", "unused.jsonl"], "chat template 'missing.jinja' is neither a known name"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["ask", "hi", "--n", "0"], ["ask", "hi", "--max-tokens", "x"], ["ask"],
                                  ["ask", "hi", "--prefix-cache-tokens", "-1"], ["ask", "hi", "--threads", "0"]])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.model
def test_ask_json_on_the_bundled_model():
    out = subprocess.run([sys.executable, "-m", "ponder.cli", "ask", "What is 6 times 7?", "--strategy", "sc",
                          "--n", "2", "--max-tokens", "48", "--seed", "3", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"answer", "votes", "branches", "usage", "model"}
    assert len(result["branches"]) == 2
    assert set(result["usage"]) >= {"prompt_tokens", "prompt_tokens_shared", "generated_tokens", "wall_s"}
    assert result["usage"]["generated_tokens"] == sum(b["generated_tokens"] for b in result["branches"])
    assert result["usage"]["prompt_tokens_shared"] == 2 * (result["usage"]["prompt_tokens"] - 1)
    assert result["model"] == {"name": "qwen2.5-0.5b",
                               "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"}


@pytest.mark.parametrize("argv, message", [
    (["ask", "hi", "--strategy", "adaptive", "--option", "init=abc"], "option init: Input should be a valid integer"),
    (["ask", "hi", "--option", "colour=blue"], "strategy 'auto' does not take option 'colour'"),
])
def test_bad_strategy_options_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_template_without_the_question_placeholder_is_one_line(tmp_path, capsys):
    template = tmp_path / "template.txt"
    template.write_text("Solve it step by step.\n")
    assert main(["ask", "hi", "--prompt-template", str(template)]) == 2
    err = capsys.readouterr().err
    assert f"--prompt-template {template}: the prompt template has no {{question}} placeholder" in err
    assert err.count("\n") == 1


def test_ask_asks_with_the_system_message_and_template_given(tmp_path, monkeypatch, capsys):
    engine = RecordingEngine(["\\boxed{4}"])
    monkeypatch.setattr(options, "load_engine", lambda *a, **k: engine)
    template = tmp_path / "template.txt"
    template.write_text("Question: {question}\nBox the answer.\n")
    assert main(["ask", "What is 2+2?", "--strategy", "sc", "--n", "2", "--system", "You are terse.",
                 "--prompt-template", str(template)]) == 0
    assert capsys.readouterr().out == "4\n"
    assert engine.chats == [[{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "Question: What is 2+2?\nBox the answer."}]]


@pytest.mark.parametrize("given, passed", [([], {}), (["--prefix-cache-tokens", "0"], {"prefix_cache_tokens": 0}),
                                           (["--threads", "1"], {"n_threads": 1})])
def test_engine_options_reach_the_engine(given, passed, monkeypatch, capsys):
    asked = {}

    def load_engine(*args, **kwargs):
        asked.update(kwargs)
        return RecordingEngine(["\\boxed{4}"])

    monkeypatch.setattr(options, "load_engine", load_engine)
    assert main(["ask", "What is 2+2?", "--strategy", "sc", "--n", "1", *given]) == 0
    assert {k: v for k, v in asked.items() if k in ("prefix_cache_tokens", "n_threads")} == passed
