"""The check that the installed llama.cpp runs on this CPU: a child that dies gives one clear line, never a crash."""

from __future__ import annotations

import signal
import sys

import pytest

import ponder
from ponder import cli
from ponder.engine import cpu_check
from ponder.engine.cpu_check import LlamaCpuError, use_extra_buffers
from ponder.models import DEFAULT_MODEL, resolve_model


def _child(kill_with_extra: bool, kill_without: bool):
    """A stand-in for the check's child: it dies with SIGILL where asked to, and exits 0 otherwise."""

    def command(model_path: str, extra_buffers: bool, threads: int) -> list[str]:
        dies = kill_with_extra if extra_buffers else kill_without
        code = f"import os, signal; os.kill(os.getpid(), signal.{signal.SIGILL.name})" if dies else "pass"
        return [sys.executable, "-c", code]

    return command


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_HOME", str(tmp_path / "home"))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


def test_a_library_that_dies_with_sigill_gives_one_line_with_the_fix(gguf, monkeypatch, capsys):
    monkeypatch.setattr(cpu_check, "child_command", _child(kill_with_extra=True, kill_without=True))
    code = cli.main(["ask", "--model", gguf, "--strategy", "greedy", "1 + 1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("ponder: error: the installed llama.cpp")
    assert "SIGILL" in err and 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir' in err


def test_the_python_api_raises_the_same_error(gguf, monkeypatch):
    monkeypatch.setattr(cpu_check, "child_command", _child(kill_with_extra=True, kill_without=True))
    with pytest.raises(LlamaCpuError, match="cannot run on this CPU"):
        ponder.ask("1 + 1", model=gguf, strategy="greedy")


def test_without_extra_buffers_when_only_they_die_and_the_verdict_is_kept(gguf, monkeypatch):
    monkeypatch.setattr(cpu_check, "child_command", _child(kill_with_extra=True, kill_without=False))
    assert use_extra_buffers(gguf) is False

    def must_not_run(*args):
        raise AssertionError("the cached verdict should answer")

    monkeypatch.setattr(cpu_check, "child_command", must_not_run)
    assert use_extra_buffers(gguf) is False


def test_a_library_that_runs_keeps_its_extra_buffers(gguf, monkeypatch):
    monkeypatch.setattr(cpu_check, "child_command", _child(kill_with_extra=False, kill_without=False))
    assert use_extra_buffers(gguf) is True


def test_a_child_that_fails_without_a_signal_is_not_blamed_on_the_cpu(gguf, monkeypatch):
    monkeypatch.setattr(cpu_check, "child_command", lambda *args: [sys.executable, "-c", "raise SystemExit(3)"])
    assert use_extra_buffers(gguf) is True  # the load in the process itself reports what is wrong
    assert not (cpu_check._verdict_file()).exists()


@pytest.mark.model
def test_the_real_check_on_the_bundled_model(tmp_path, monkeypatch):
    path = resolve_model(DEFAULT_MODEL).path  # from the usual cache, before PONDER_HOME moves the verdicts
    monkeypatch.setenv("PONDER_HOME", str(tmp_path))
    verdict = use_extra_buffers(path)
    assert isinstance(verdict, bool)
    assert cpu_check._read_verdicts()[cpu_check._check_key(path)]["extra_buffers"] is verdict


def test_ponder_models_tells_how_the_library_runs_each_checked_model(gguf, monkeypatch):
    assert "not checked on this CPU yet" in cpu_check.describe()
    monkeypatch.setattr(cpu_check, "child_command", _child(kill_with_extra=True, kill_without=False))
    use_extra_buffers(gguf)
    assert "tiny.gguf: runs without its extra weight buffers" in cpu_check.describe()
