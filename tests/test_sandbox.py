"""The program sandbox: limits, timeout kill, no network, no writes outside its directory, no new processes."""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
import time

import pytest

from ponder.verifiers.sandbox import Limits, run_python


def run(code: str, **limits):
    return asyncio.run(run_python(textwrap.dedent(code), Limits(**limits)))


def test_runs_a_program_and_returns_what_it_printed():
    outcome = run("print(sum(range(10)))")
    assert outcome.ok and outcome.stdout == "45\n" and not outcome.timed_out


def test_reports_a_crash_with_its_traceback():
    outcome = run("1 / 0")
    assert not outcome.ok and "ZeroDivisionError" in outcome.stderr


def test_an_infinite_loop_is_killed_by_the_cpu_limit():
    start = time.monotonic()
    outcome = run("while True:\n    pass", cpu_s=1, timeout_s=30)
    assert outcome.returncode is not None and outcome.returncode < 0  # killed by a signal (SIGXCPU / SIGKILL)
    assert time.monotonic() - start < 15


def test_a_sleeping_program_is_killed_at_the_timeout_with_its_process_group():
    outcome = run("""
        import os, time
        print(os.getpid(), flush=True)
        time.sleep(60)
    """, timeout_s=1)
    assert outcome.timed_out and outcome.returncode is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(outcome.stdout), 0)


def test_network_access_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        outcome = run(f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
            print("connected")
        """)
        assert not outcome.ok and "connected" not in outcome.stdout
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever arrived
    finally:
        server.close()


def test_creating_a_raw_socket_is_refused():
    outcome = run("import socket; socket.socket(socket.AF_UNIX)")
    assert not outcome.ok and "not allowed" in outcome.stderr


@pytest.mark.parametrize("write", [
    "open({path!r}, 'w').write('x')",
    "open({path!r}, 'a').write('x')",
    "import os; os.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib; pathlib.Path({path!r}).write_text('x')",
    "open('mine.txt', 'w').write('x'); import os; os.rename('mine.txt', {path!r})",
    "import shutil; open('mine.txt', 'w').write('x'); shutil.copyfile('mine.txt', {path!r})",
])
def test_writes_outside_the_working_directory_are_refused(tmp_path, write):
    target = tmp_path / "escaped.txt"
    outcome = run(write.format(path=str(target)))
    assert not outcome.ok and "outside the working directory" in outcome.stderr
    assert not target.exists()


def test_existing_files_outside_cannot_be_removed_or_changed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"import os; os.remove({str(victim)!r})", f"import os; os.chmod({str(victim)!r}, 0o777)",
                 f"open('../../{victim.parent.name}/victim.txt', 'w')"):
        assert not run(code).ok
    assert victim.read_text() == "keep me"


def test_writing_inside_the_working_directory_works():
    outcome = run("""
        with open("notes.txt", "w") as f:
            f.write("12")
        print(int(open("notes.txt").read()) * 2)
    """)
    assert outcome.ok and outcome.stdout == "24\n"


@pytest.mark.parametrize("code", [
    "import subprocess; subprocess.run(['true'])",
    "import os; os.system('true')",
    "import os; os.fork()",
    "import ctypes; ctypes.CDLL(None).getpid()",
    "import resource; resource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
])
def test_escapes_from_the_hook_are_refused(code):
    outcome = run(code)
    assert not outcome.ok and "not allowed" in outcome.stderr


def test_memory_and_output_are_capped():
    assert "MemoryError" in run("x = bytearray(4 << 30)", memory_mb=512).stderr
    flood = run("print('x' * 5_000_000)", output_kb=64)
    assert not flood.ok and len(flood.stdout) <= 64 * 1024


def test_numpy_still_works_inside():
    outcome = run("import numpy as np; print(int(np.arange(5).sum()))")
    assert outcome.ok and outcome.stdout == "10\n"


def test_the_environment_is_minimal():
    outcome = run("import os; print(sorted(os.environ))")
    assert "HOME" not in outcome.stdout and "PATH" in outcome.stdout
