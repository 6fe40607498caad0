"""A cgroup per sandbox run (``sandbox.py``): the memory limit that counts everything a program makes the kernel
hold, and a process limit.

rlimits bound a process's own address space; the memory cgroup also counts what the kernel holds for it: tmpfs and
shared-memory pages, inodes, dentries, xattrs, pipe and socket buffers. A run's cgroup gets ``memory`` =
``Limits.memory_mb`` (no swap beyond it) and ``pids`` = ``RUN_PROCESSES``; at the limit the kernel reclaims, then
kills the program. The shell that execs bwrap moves itself in first (``procs_files``), so nothing of the run is
ever outside.

Used where this process may make cgroups: as root, or with a delegated subtree. Each controller is taken from cgroup
v2 where it is enabled there, else from its v1 hierarchy (hybrid machines mount memory as v1). Where neither works,
``RunCgroup.make`` returns None and the sandbox relies on its seccomp filter and rlimits alone (see docs/sandbox.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..engine.base import PonderError

log = logging.getLogger(__name__)

PREFIX = "ponder-sandbox-"
NAME = re.compile(re.escape(PREFIX) + r"(\d+)-\d+")  # ponder-sandbox-<pid of the ponder that made it>-<run>
# bwrap and the program it starts. The seccomp filter is what stops a program from forking; this bounds the run
# even so, with room for a bwrap that forks once more during setup.
RUN_PROCESSES = 4
REMOVE_WAIT_S = 5.0  # a killed program's last pages are released a moment after bwrap has reaped it


@dataclass(frozen=True)
class Controller:
    name: str  # "memory" or "pids"
    parent: Path  # the cgroup under which each run gets its own
    v2: bool

    def limits(self, memory_bytes: int) -> dict[str, str]:
        """The limit files of a run's cgroup, in the order to write them."""
        if self.name == "pids":
            return {"pids.max": str(RUN_PROCESSES)}
        if self.v2:
            return {"memory.max": str(memory_bytes), "memory.swap.max": "0"}
        # v1: the memory+swap limit may not be set below the memory limit, so that comes first.
        return {"memory.limit_in_bytes": str(memory_bytes), "memory.memsw.limit_in_bytes": str(memory_bytes)}


class RunCgroup:
    """The cgroups of one run: one directory under cgroup v2, one per controller under v1."""

    _runs = 0

    def __init__(self, directories: list[Path]):
        self.directories = directories

    @classmethod
    def make(cls, memory_mb: int) -> RunCgroup | None:
        """The cgroups of a new run with these limits, or None where this process cannot make them."""
        controllers = usable_controllers()
        if not controllers:
            return None
        cls._runs += 1
        name = f"{PREFIX}{os.getpid()}-{cls._runs}"
        run = cls([])
        try:
            for controller in controllers:
                directory = controller.parent / name
                if directory not in run.directories:
                    directory.mkdir()
                    run.directories.append(directory)
                for file, value in controller.limits(memory_mb << 20).items():
                    if (directory / file).exists():  # memory.memsw.* / memory.swap.max: only with swap accounting
                        (directory / file).write_text(value)
        except OSError as exc:
            run.remove_now()
            raise PonderError(f"cannot make the cgroup of a sandbox run: {exc}") from exc
        return run

    @property
    def procs_files(self) -> list[Path]:
        """Where the run's first process writes ``0`` to move itself in."""
        return [directory / "cgroup.procs" for directory in self.directories]

    async def remove(self) -> None:
        """Remove the run's cgroups once its processes are gone (they are killed and reaped before this is called)."""
        deadline = asyncio.get_running_loop().time() + REMOVE_WAIT_S
        while not self.remove_now() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self.directories:
            log.warning("could not remove the sandbox cgroups %s", ", ".join(map(str, self.directories)))

    def remove_now(self) -> bool:
        for directory in list(self.directories):
            try:
                directory.rmdir()
                self.directories.remove(directory)
            except FileNotFoundError:
                self.directories.remove(directory)
            except OSError:  # EBUSY: a process is still in it
                pass
        return not self.directories


@cache
def usable_controllers() -> tuple[Controller, ...]:
    """The memory and pids controllers under which this process can make and join cgroups; () where it cannot.

    Checked once per process, with a trial cgroup that a shell joins, as each run's will; also removes the empty
    cgroups that a ponder which has since died left behind."""
    controllers = []
    for name in ("memory", "pids"):
        controller = _controller(name)
        if controller is None:
            log.info("no %s cgroup controller usable here: sandbox runs go without cgroups", name)
            return ()
        controllers.append(controller)
    for controller in controllers:
        _remove_left_by_dead_ponders(controller.parent)
    trial = RunCgroup(list(dict.fromkeys(controller.parent / f"{PREFIX}{os.getpid()}-0" for controller in controllers)))
    try:
        for directory in trial.directories:
            directory.mkdir()
        subprocess.run(["/bin/sh", "-c", 'for procs; do echo 0 > "$procs" || exit 1; done', "sh",
                        *map(str, trial.procs_files)], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("cannot make cgroups for sandbox runs here (%s): they go without", exc)
        return ()
    finally:
        trial.remove_now()
    return tuple(controllers)


def _controller(name: str) -> Controller | None:
    """Where this process's cgroup for ``name`` is and may get children with that controller, v2 before v1."""
    mounts = _cgroup_mounts()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and "cgroup2" in mounts:
            directory = _inside(mounts["cgroup2"], path)
            try:
                if name in (directory / "cgroup.controllers").read_text().split():
                    if name not in (directory / "cgroup.subtree_control").read_text().split():
                        # Fails (EBUSY) where this cgroup holds processes and is not the root: v2 enables
                        # controllers for the children only of cgroups without processes of their own.
                        (directory / "cgroup.subtree_control").write_text(f"+{name}")
                    return Controller(name, directory, v2=True)
            except OSError:
                pass
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if name in controllers.split(",") and name in mounts:
            directory = _inside(mounts[name], path)
            if os.access(directory, os.W_OK):
                return Controller(name, directory, v2=False)
    return None


def _cgroup_mounts() -> dict[str, tuple[Path, str]]:
    """"cgroup2", and each v1 controller -> (mount point, the hierarchy's path mounted there)."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, filesystem = line.partition(" - ")
        root, mount_point = fields.split()[3:5]
        kind, _, options = filesystem.split()[:3]
        for hierarchy in ["cgroup2"] if kind == "cgroup2" else options.split(",") if kind == "cgroup" else []:
            mounts.setdefault(hierarchy, (Path(mount_point), root))
    return mounts


def _inside(mount: tuple[Path, str], path: str) -> Path:
    mount_point, root = mount
    relative = Path(path).relative_to(root) if Path(path).is_relative_to(root) else Path(path.lstrip("/"))
    return mount_point / relative


def _remove_left_by_dead_ponders(parent: Path) -> None:
    for directory in parent.glob(f"{PREFIX}*"):
        match = NAME.fullmatch(directory.name)
        if match and not _alive(int(match.group(1))):
            try:
                directory.rmdir()
            except OSError:  # still holds a process, or already gone
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
