"""The program sandbox (ponder/programs/sandbox.py), tried as a hostile program would: each attack must fail to do
what it tries, checked on its effect outside the sandbox where there is one. Benign programs still work; where bwrap
cannot isolate, programs are refused unless the user opts in."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import ponder
from ponder.cli import main as ponder_main
from ponder.engine import PonderError
from ponder.programs import Limits, cgroup, run_python, sandbox, seccomp

SH = "/usr/bin/sh"
STARTED = "started"  # what a program prints when it managed to start a process
REFUSALS = ("Operation not permitted", "can't start new thread", f"exit status {127 << 8}")
CLONE = {"x86_64": 56, "aarch64": 220}[platform.machine()]  # the raw syscall behind fork and threads


def run(code: str, **limits):
    return asyncio.run(run_python(textwrap.dedent(code), Limits(**limits)))


# -- benign programs still work ---------------------------------------------------------------------------------------

def test_runs_a_program_and_returns_what_it_printed():
    outcome = run("print(sum(range(10)))")
    assert outcome.ok and outcome.stdout == "45\n" and not outcome.timed_out


def test_the_standard_library_does_math():
    outcome = run("""
        import itertools, math, statistics
        from decimal import Decimal
        from fractions import Fraction
        print(math.comb(10, 3), Fraction(1, 3) + Fraction(1, 6), Decimal("0.1") + Decimal("0.2"))
        print(len(list(itertools.permutations(range(4)))), statistics.median([3, 1, 2]))
    """)
    assert outcome.ok and outcome.stdout == "120 1/2 0.3\n24 2\n"


def test_numpy_and_sympy_are_importable():
    outcome = run("""
        import numpy as np, sympy
        x = sympy.symbols("x")
        print(int(np.arange(5).sum()), sympy.solve(x**2 - 4, x))
    """)
    assert outcome.ok and outcome.stdout == "10 [-2, 2]\n"


def test_reports_a_crash_with_its_traceback():
    outcome = run("1 / 0")
    assert not outcome.ok and "ZeroDivisionError" in outcome.stderr


def test_exit_works_and_gives_the_status():
    assert run("print('bye'); exit(3)").returncode == 3


def test_the_working_directory_is_writable():
    outcome = run("""
        with open("notes.txt", "w") as f:
            f.write("12")
        print(int(open("/tmp/notes.txt").read()) * 2)
    """)
    assert outcome.ok and outcome.stdout == "24\n"


def test_the_environment_is_minimal():
    outcome = run("import os, sys; print(sorted(os.environ)); print(sys.path)")
    assert outcome.ok and "HOME" not in outcome.stdout and sys.prefix not in outcome.stdout


# -- file system: nothing outside is readable or writable --------------------------------------------------------------

def test_only_the_sandbox_s_own_tree_is_visible():
    outcome = run("import os; print(sorted(os.listdir('/')))")
    allowed = {"usr", "lib", "lib32", "lib64", "libx32", "sandbox", "tmp", "dev", Path(sys.base_prefix).parts[1]}
    assert outcome.ok and set(eval(outcome.stdout)) <= allowed


@pytest.mark.parametrize("target", ["secret", "project", "shadow"])
def test_cannot_read_a_file_outside(tmp_path, target):
    secret = tmp_path / "secret.txt"
    secret.write_text("the launch code is 0000")
    path, content = {"secret": (secret, "launch code"),
                     "project": (Path(ponder.__file__).parents[1] / "pyproject.toml", "[project]"),
                     "shadow": (Path("/etc/shadow"), "root:")}[target]
    outcome = run(f"print(open({str(path)!r}).read())")
    assert not outcome.ok and content not in outcome.stdout


def test_cannot_list_the_home_directory():
    home = Path.home()
    # The interpreter's prefix may live under the home (pyenv); then only the path down to it is there.
    base = Path(sys.base_prefix)
    allowed = {base.relative_to(home).parts[0]} if base.is_relative_to(home) else set()
    outcome = run(f"import os; print(os.listdir({str(home)!r}))")
    if allowed:
        assert outcome.ok and set(eval(outcome.stdout)) <= allowed
    else:
        assert not outcome.ok and "No such file" in outcome.stderr


@pytest.mark.parametrize("write", [
    "open({path!r}, 'w').write('x')",
    "import os; os.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "import os; open('mine.txt', 'w').write('x'); os.rename('mine.txt', {path!r})",
    "import shutil; open('mine.txt', 'w').write('x'); shutil.copyfile('mine.txt', {path!r})",
])
@pytest.mark.parametrize("where", ["test dir", "/usr", "interpreter", "root", "program"])
def test_cannot_write_outside_the_working_directory(tmp_path, write, where):
    path = {"test dir": str(tmp_path / "escaped.txt"), "/usr": "/usr/ponder-escaped.txt",
            "interpreter": os.path.join(sys.base_prefix, "ponder-escaped.txt"), "root": "/ponder-escaped.txt",
            "program": "/sandbox/main.py"}[where]
    outcome = run(write.format(path=path))
    refusals = ("Read-only file system", "No such file", "Invalid cross-device link")
    assert not outcome.ok and any(refusal in outcome.stderr for refusal in refusals)
    assert not Path(path).exists() or where == "program"


def test_files_outside_cannot_be_removed_or_changed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"import os; os.remove({str(victim)!r})", f"import os; os.chmod({str(victim)!r}, 0o777)",
                 f"import os; os.truncate({str(victim)!r}, 0)"):
        assert not run(code).ok
    assert victim.read_text() == "keep me" and victim.stat().st_mode & 0o777 != 0o777


def test_a_setuid_file_cannot_be_made(tmp_path):
    outcome = run(f"""
        import os
        open("tool", "w").close()
        print("nosuid" if os.statvfs(".").f_flag & os.ST_NOSUID else "suid works")  # its scratch space
        for chmod in (lambda: os.chmod("tool", 0o4755), lambda: os.fchmod(os.open("tool", os.O_RDONLY), 0o2755)):
            try:
                chmod()
            except PermissionError:
                print("refused")
        print(oct(os.stat("tool").st_mode))
        open({str(tmp_path / "tool")!r}, "w")
    """)
    assert outcome.stdout.splitlines()[:3] == ["nosuid", "refused", "refused"] and not outcome.ok
    assert outcome.stdout.splitlines()[3] == "0o100644"
    assert list(tmp_path.iterdir()) == []


def test_scratch_space_is_capped():
    outcome = run("""
        for i in range(100):
            open(f"file{i}", "wb").write(bytes(1 << 20))
    """, scratch_mb=8)
    assert not outcome.ok and "No space left on device" in outcome.stderr


# -- processes: none can be started, and none outlives the run ---------------------------------------------------------

START_ROUTES = {
    "subprocess": "import subprocess; subprocess.run([{sh!r}, '-c', {cmd!r}])",
    "os.system": "import os\nif status := os.system({cmd!r}):\n    raise OSError(f'exit status {{status}}')",
    "os.fork": "import os\nif os.fork() == 0:\n    os.execv({sh!r}, ['sh', '-c', {cmd!r}])",
    "os.posix_spawn": "import os; os.posix_spawn({sh!r}, ['sh', '-c', {cmd!r}], {{}})",
    "os.spawnv": "import os; os.spawnv(os.P_WAIT, {sh!r}, ['sh', '-c', {cmd!r}])",
    "os.forkpty": "import os\nif os.forkpty()[0] == 0:\n    os.execv({sh!r}, ['sh', '-c', {cmd!r}])",
    "_posixsubprocess": (  # the route that raised no audit event in the sandbox before this one
        "import _posixsubprocess, os\nerr_read, err_write = os.pipe()\n"
        "_posixsubprocess.fork_exec([{sh!r}, '-c', {cmd!r}], [{sh!r}.encode()], True, (), None, None, -1, -1, -1,"
        " -1, -1, -1, err_read, err_write, True, False, -1, None, None, None, -1, None, True)"),
    "multiprocessing": ("import multiprocessing, os\n"
                        "p = multiprocessing.Process(target=os.system, args=({cmd!r},)); p.start(); p.join()"),
    "thread": "import os, threading; t = threading.Thread(target=os.system, args=({cmd!r},)); t.start(); t.join()",
    "ctypes fork": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\npid = libc.fork()\n"
                    "if pid == 0:\n    os.execv({sh!r}, ['sh', '-c', {cmd!r}])\n"
                    "if pid < 0:\n    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))"),
    "ctypes system": ("import ctypes\nif status := ctypes.CDLL(None).system({cmd!r}.encode()):\n"
                      "    raise OSError(f'exit status {{status}}')"),
    "raw clone": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                  "pid = libc.syscall(%d, %d, 0, 0, 0, 0)\n" % (CLONE, signal.SIGCHLD) +
                  "if pid == 0:\n    os.execv({sh!r}, ['sh', '-c', {cmd!r}])\n"
                  "if pid < 0:\n    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))"),
}


@pytest.mark.parametrize("route", START_ROUTES)
def test_cannot_start_a_process(tmp_path, route):
    marker = tmp_path / "marker"
    command = f"echo pwned > {marker}; echo pwned > /tmp/marker"
    outcome = run(START_ROUTES[route].format(sh=SH, cmd=command) + f"\nprint({STARTED!r})")
    # Refused by the kernel, whichever way the interpreter reports it (system() says it could not start its shell) ...
    assert any(refusal in outcome.stderr for refusal in REFUSALS)
    # ... and so nothing it meant to do happened.
    assert STARTED not in outcome.stdout and not marker.exists()


def test_exec_only_replaces_the_program_inside_the_sandbox(tmp_path):
    marker, secret = tmp_path / "marker", tmp_path / "secret.txt"
    secret.write_text("the launch code is 0000")
    script = f'echo pwned > {marker}; read line < {secret}; echo "$line"; echo shell ran'  # builtins: sh cannot fork
    outcome = run(f"import os; os.execv({SH!r}, ['sh', '-c', {script!r}])")
    assert "shell ran" in outcome.stdout and "launch code" not in outcome.stdout and not marker.exists()


def test_a_fork_bomb_ends_at_once():
    start = time.monotonic()
    outcomes = [run("import os\nwhile True:\n    os.fork()"),
                run("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()")]
    assert all(not outcome.ok and not outcome.timed_out for outcome in outcomes)
    assert time.monotonic() - start < 10


def _processes_with(token: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:  # the process ended while we looked
            pass
    return found


def _zombies() -> set[str]:
    """Zombie processes a run may leave: bwrap, the sandbox's interpreter, or the shell the tests exec."""
    names = {"bwrap", "sh", Path(sandbox.INTERPRETER).name}
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if any(f"({name}) Z " in stat.read_text() for name in names):
                found.add(stat.parent.name)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("program", [
    # still running at the timeout, as a shell with a recognisable command line
    "import os; os.execv({sh!r}, ['sh', '-c', 'sleep 60', {token!r}])",
    # tries to leave a detached process behind, then ends at once
    ("import subprocess\ntry:\n    subprocess.Popen([{sh!r}, '-c', 'sleep 60', {token!r}], start_new_session=True)\n"
     "except OSError:\n    pass"),
])
def test_no_process_outlives_the_run(program):
    token = f"ponder-test-{uuid.uuid4()}"
    zombies = _zombies()
    outcome = run(program.format(sh=SH, token=token), timeout_s=1)
    assert outcome.returncode is not None or outcome.timed_out
    assert _processes_with(token) == []
    assert _zombies() <= zombies  # bwrap reaped its child: none was left to an init that may not reap


def test_cannot_signal_processes_outside():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        outcome = run(f"""
            import os, signal
            for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, -1):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as exc:
                    print(pid, exc)
        """)
        assert outcome.returncode is not None
        assert bystander.poll() is None  # still alive, and so is this test's process
    finally:
        bystander.kill()
        bystander.wait()


def test_risky_kernel_interfaces_are_refused():
    numbers = [seccomp.SYSCALL_NUMBERS[platform.machine()][name] for name in seccomp.REFUSED_SYSCALLS
               if name in seccomp.SYSCALL_NUMBERS[platform.machine()]]
    outcome = run(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for number in {numbers!r}:
            print(number, libc.syscall(number, 0, 0, 0, 0, 0), ctypes.get_errno())
    """)
    assert outcome.ok and outcome.stdout.splitlines() == [f"{number} -1 1" for number in numbers]  # EPERM


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 ABI is x86_64's")
def test_the_x32_abi_is_refused():
    outcome = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.syscall(0x40000000 + 39, 0, 0, 0, 0, 0), ctypes.get_errno())  # getpid through x32
    """)
    assert outcome.stdout == "-1 1\n"


# -- network -----------------------------------------------------------------------------------------------------------

def test_cannot_reach_a_listener_on_this_machine():
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix_name = f"\0ponder-test-{uuid.uuid4()}"  # an abstract socket: no file, shared by the network namespace
    unix.bind(unix_name)
    unix.listen()
    try:
        outcome = run(f"""
            import socket
            for family, address in ((socket.AF_INET, ("127.0.0.1", {tcp.getsockname()[1]})),
                                    (socket.AF_UNIX, {unix_name!r}), (socket.AF_INET, ("1.1.1.1", 53))):
                try:
                    socket.socket(family).connect(address)
                    print("connected")
                except OSError as exc:
                    print(exc)
        """)
        assert outcome.ok and "connected" not in outcome.stdout
        for listener in (tcp, unix):
            listener.settimeout(0.2)
            with pytest.raises(socket.timeout):
                listener.accept()  # nothing ever arrived
    finally:
        tcp.close()
        unix.close()


# -- resource limits ---------------------------------------------------------------------------------------------------

def test_an_infinite_loop_is_killed_by_the_cpu_limit():
    start = time.monotonic()
    outcome = run("while True:\n    pass", cpu_s=1, timeout_s=30)
    assert outcome.returncode is not None and outcome.returncode > 128  # killed by a signal
    assert time.monotonic() - start < 10


def test_a_sleeping_program_is_killed_at_the_timeout():
    start = time.monotonic()
    outcome = run("import time; time.sleep(60)", timeout_s=1)
    assert outcome.timed_out and outcome.returncode is None and time.monotonic() - start < 5


def test_memory_is_capped():
    assert "MemoryError" in run("x = bytearray(4 << 30)").stderr


def test_output_is_capped():
    start = time.monotonic()
    flood = run("print('x' * 100_000_000)", output_kb=64)
    assert not flood.ok and len(flood.stdout) <= 64 * 1024 and time.monotonic() - start < 10


def test_limits_cannot_be_raised_again():
    outcome = run("import resource; resource.setrlimit(resource.RLIMIT_CPU, (100, 100))")
    assert not outcome.ok and "not allowed to raise maximum limit" in outcome.stderr


# -- resources outside the rlimits (issue 35): each refused, or bounded by the kernel ----------------------------------

def test_system_v_ipc_and_message_queues_are_refused():
    """System V objects and POSIX message queues would hold host memory that no rlimit counts, until the run ends."""
    outcome = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        librt = ctypes.CDLL("librt.so.1", use_errno=True)
        for name, call in (("shmget", lambda: libc.shmget(0, 64 << 20, 0o1600)),  # IPC_PRIVATE, IPC_CREAT | 0600
                           ("msgget", lambda: libc.msgget(0, 0o1600)), ("semget", lambda: libc.semget(0, 1, 0o1600)),
                           ("mq_open", lambda: librt.mq_open(b"/ponder", 0o100 | 2, 0o600, None))):
            print(name, call(), ctypes.get_errno())
    """)
    assert outcome.ok and outcome.stdout.split() == [word for name in ("shmget", "msgget", "semget", "mq_open")
                                                      for word in (name, "-1", "1")]  # EPERM


def test_extended_attributes_are_refused():
    """An xattr costs kernel memory that the size of /tmp does not count."""
    outcome = run("""
        import os
        open("/tmp/x", "w").close()
        for target in ("/tmp/x", 1):
            try:
                os.setxattr(target, "user.a", bytes(60_000))
                print("set")
            except OSError as exc:
                print(exc.errno)
    """)
    assert outcome.ok and outcome.stdout.split() == ["1", "1"]


def test_scratch_space_holds_a_bounded_number_of_files():
    """Each file or directory costs kernel memory that the size of /tmp does not count: their number is capped."""
    outcome = run("""
        import os
        for made in range(20_000):
            os.mkdir(f"/tmp/{made}")
    """)
    assert not outcome.ok and "No space left on device: '/tmp/4095'" in outcome.stderr  # the root is the 4096th


def test_outputs_are_pipes_that_cannot_be_reshaped():
    """stdout and stderr are pipes: nothing on the host to allocate, chmod, lease or truncate, and the calls that
    would do so to a file of its own are refused too."""
    outcome = run("""
        import ctypes, fcntl, os, stat
        libc = ctypes.CDLL(None, use_errno=True)
        print(stat.S_ISFIFO(os.fstat(1).st_mode), stat.S_ISFIFO(os.fstat(2).st_mode))
        mine = os.open("/tmp/mine", os.O_RDWR | os.O_CREAT)
        for fd in (1, mine):
            print(libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(64 << 20)), ctypes.get_errno())  # KEEP_SIZE
            for name, call in (("fchmod", lambda: os.fchmod(fd, 0o6777)), ("fchown", lambda: os.fchown(fd, 0, 0)),
                               ("lease", lambda: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK))):
                try:
                    call()
                    print(name, "done")
                except OSError as exc:
                    print(name, exc.errno)
        print(os.fstat(mine).st_blocks)
    """)
    assert outcome.ok, outcome.stderr
    assert outcome.stdout.splitlines() == ["True True"] + ["-1 1", "fchmod 1", "fchown 1", "lease 1"] * 2 + ["0"]


def test_ponder_reads_at_most_the_output_cap():
    """A range inserted into a file-backed stdout made ponder read (and hold) all of it; a pipe holds what was
    written, and ponder reads no more than the cap of it."""
    outcome = run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        os.write(1, b"x" * 4096)
        libc.fallocate(1, 0x20, ctypes.c_long(0), ctypes.c_long(64 << 20))  # FALLOC_FL_INSERT_RANGE
        os.write(1, b"y" * (1 << 20))
    """, output_kb=64)
    assert len(outcome.stdout) == 64 << 10 and outcome.stdout == "x" * 4096 + "y" * ((64 << 10) - 4096)
    assert outcome.returncode == 128 + signal.SIGKILL  # killed once it printed past the cap


@pytest.mark.parametrize("family", ["AF_VSOCK", "AF_PACKET", "AF_NETLINK", "AF_INET", "AF_INET6"])
def test_only_unix_sockets_can_be_made(family):
    """AF_VSOCK reaches the hypervisor of a virtual machine from any network namespace; no family but AF_UNIX is
    needed."""
    outcome = run(f"""
        import errno, socket
        a, b = socket.socketpair()
        a.sendall(b"unix works")
        print(b.recv(64).decode())
        for call in (lambda: socket.socket(socket.{family}, socket.SOCK_DGRAM),
                     lambda: socket.socketpair(socket.{family}, socket.SOCK_DGRAM)):
            try:
                call()
                print("made")
            except OSError as exc:
                print(errno.errorcode[exc.errno])
    """)
    assert outcome.ok and outcome.stdout.split("\n")[:3] == ["unix works", "EAFNOSUPPORT", "EAFNOSUPPORT"]


def _run_cgroups() -> list[Path]:
    return [directory for controller in cgroup.usable_controllers()
            for directory in controller.parent.glob(f"{cgroup.PREFIX}{os.getpid()}-*")]


needs_cgroups = pytest.mark.skipif(not cgroup.usable_controllers(), reason="no usable cgroups here")


@needs_cgroups
def test_a_run_has_its_own_memory_and_pids_cgroup():
    async def look_during_the_run():
        running = asyncio.ensure_future(run_python("import time; time.sleep(1)", Limits(memory_mb=300)))
        await asyncio.sleep(0.5)
        found = {path.name: path.read_text().strip() for directory in _run_cgroups()
                 for path in directory.glob("*") if path.name in ("memory.max", "memory.limit_in_bytes", "pids.max")}
        members = [path.read_text().split() for directory in _run_cgroups() for path in directory.glob("cgroup.procs")]
        return found, members, await running

    found, members, outcome = asyncio.run(look_during_the_run())
    assert outcome.ok
    assert found.get("memory.max", found.get("memory.limit_in_bytes")) == str(300 << 20)
    assert found["pids.max"] == str(cgroup.RUN_PROCESSES)
    assert members and all(len(pids) == 2 for pids in members)  # bwrap and the program
    assert _run_cgroups() == []  # removed after the run


@needs_cgroups
def test_kernel_memory_counts_against_the_memory_limit():
    """Directories cost kernel memory only: with inodes to spare, the memory cgroup still stops the flood."""
    outcome = run("""
        import os
        for made in range(400_000):
            os.mkdir(f"/tmp/{made}")
        print("made them all")
    """, memory_mb=128, scratch_files=1_000_000)
    assert outcome.returncode == 128 + signal.SIGKILL and "made them all" not in outcome.stdout
    assert _run_cgroups() == []


def test_nothing_is_left_behind():
    before = set(Path(tempfile.gettempdir()).glob("ponder-sandbox-*"))
    for code, limits in (("print('x' * 10_000_000)", {"output_kb": 8}), ("import time; time.sleep(60)",
                                                                         {"timeout_s": 0.5}), ("1 / 0", {})):
        run(code, **limits)
    assert set(Path(tempfile.gettempdir()).glob("ponder-sandbox-*")) <= before
    assert _run_cgroups() == []


@pytest.mark.parametrize("limit", ["timeout_s", "memory_mb", "output_kb", "scratch_files"])
def test_limits_must_be_positive(limit):
    with pytest.raises(ValueError, match=f"{limit} must be positive"):
        Limits(**{limit: 0})


# -- where bwrap cannot isolate ----------------------------------------------------------------------------------------

@pytest.fixture
def no_working_bwrap(tmp_path, monkeypatch):
    """bwrap candidates that fail their probe: a missing binary, and one that fails as bwrap does without user
    namespaces."""
    failing = tmp_path / "bwrap"
    failing.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(sandbox, "bwrap_candidates", lambda: ["/nonexistent/bwrap", str(failing)])
    monkeypatch.delenv(sandbox.UNSANDBOXED_OPT_IN, raising=False)


def test_the_probe_says_why_a_bwrap_does_not_work(tmp_path):
    assert sandbox.probe("/nonexistent/bwrap") == "cannot run it: No such file or directory"
    assert sandbox.probe(sandbox.bwrap_candidates()[0]) is None  # the real one works on this machine


@pytest.mark.parametrize("opt_in", [None, "yes", "0"])
def test_without_isolation_programs_are_refused(no_working_bwrap, monkeypatch, opt_in):
    if opt_in is not None:
        monkeypatch.setenv(sandbox.UNSANDBOXED_OPT_IN, opt_in)  # only "1" opts in
    with pytest.raises(PonderError, match="No permissions to create a new namespace.*user namespaces.*"
                                          + sandbox.UNSANDBOXED_OPT_IN):
        run("print(1)")


def test_the_opt_in_runs_programs_unisolated_with_the_limits(no_working_bwrap, monkeypatch):
    monkeypatch.setenv(sandbox.UNSANDBOXED_OPT_IN, "1")
    assert run("import numpy; print(numpy.arange(3).sum())").stdout == "3\n"
    assert "MemoryError" in run("x = bytearray(4 << 30)").stderr
    assert run("import time; time.sleep(60)", timeout_s=1).timed_out


def test_serve_refuses_the_opt_in_without_its_own_flag(monkeypatch, capsys):
    monkeypatch.setenv(sandbox.UNSANDBOXED_OPT_IN, "1")
    assert ponder_main(["serve", "--port", "0"]) == 2
    assert "--allow-unsandboxed-code" in capsys.readouterr().err
