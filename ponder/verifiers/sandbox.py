"""Run untrusted Python (model-written programs) in a child process with hard limits.

The child is ``python -I -B`` (isolated: no environment variables, no user site, no project on ``sys.path``; no
bytecode written) in a throwaway working directory, with a minimal environment. ``sandbox_child`` sets the resource
limits (CPU seconds, address space, open files, file size) and installs an audit hook that refuses network access,
new processes and writes outside the working directory. Where the system allows it (root, or unprivileged user
namespaces), the child also runs in an empty network namespace (``unshare -n``). The whole process group is killed
when the wall-clock timeout passes. Output is written to files in the working directory, so the file-size limit
also caps how much a program can print.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
MINIMAL_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then the process group is killed
    cpu_s: int = 5
    memory_mb: int = 1024  # address space
    open_files: int = 64
    output_kb: int = 1024  # largest file the program may write, its stdout and stderr included


@dataclass(frozen=True)
class Outcome:
    stdout: str
    stderr: str
    returncode: int | None  # None when the program was killed on timeout
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@cache
def network_isolation() -> tuple[str, ...]:
    """``("unshare", "-n")`` when this system lets us make a network namespace, else ``()`` (the hook still refuses
    sockets)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=10)
    return (unshare, "-n") if probe.returncode == 0 else ()


async def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Run ``code`` as a program in the sandbox and return what it printed."""
    with tempfile.TemporaryDirectory(prefix="ponder-sandbox-") as tmp:
        # The outputs sit beside the working directory, not in it, so the program cannot replace or remove them.
        work, stdout, stderr = Path(tmp, "work"), Path(tmp, "stdout"), Path(tmp, "stderr")
        work.mkdir()
        (work / "main.py").write_text(code, encoding="utf-8")
        limit_args = [str(limits.cpu_s), str(limits.memory_mb << 20), str(limits.open_files),
                      str(limits.output_kb << 10)]
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *network_isolation(), sys.executable, "-I", "-B", str(CHILD), *limit_args, "main.py",
                cwd=work, env=MINIMAL_ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                returncode = await asyncio.wait_for(proc.wait(), limits.timeout_s)
            except asyncio.TimeoutError:
                returncode = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # on timeout, and whatever a finished program left behind
                except ProcessLookupError:
                    pass
                await proc.wait()
        return Outcome(_text(stdout), _text(stderr), returncode, returncode is None)


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")
