"""What a hostile program costs the host through ``ponder.programs.sandbox.run_python`` (issue 35), measured per class.

    python -m benchmarks.robustness.bench_sandbox_hostile --out benchmarks/results/robustness/sandbox-hostile.json
    python -m benchmarks.robustness.bench_sandbox_hostile --rev 1ec433c \
        --out benchmarks/results/robustness/sandbox-hostile-before.json

``--rev`` measures the sandbox as it was at a git revision (its ``ponder/programs/`` or, before issue 31,
``ponder/sandbox*.py``, loaded beside today's package), so the code before and after a change runs the same attacks on
the same machine.

Each class is one program run with the default ``Limits`` but 256 MiB of memory, while a thread samples, every
20 ms, what the host holds because of it: shared memory (``Shmem`` of /proc/meminfo: the sandbox's System V segments
live in its own IPC namespace, invisible to /proc/sysvipc here, but their pages count there), kernel slab (``Slab``,
``SUnreclaim``), the disk allocated by the run's output files (``st_blocks`` of the files in the run's
``ponder-sandbox-*`` directory) and their set-id bits, and this process's RSS (ponder's own memory: what
``run_python`` reads back). Every attack is bounded so that the measurement itself stays small on a shared machine:
512 MiB of shared memory, 256 MiB of xattrs, 300,000 directories, a 512 MiB ``fallocate`` and a 128 MiB inserted
range. At the end: what is left behind (temporary directories, the sandbox's cgroups, IPC objects, processes).

Targets (issue 35): host memory per run <= its memory limit + 10 %; slab growth <= 256 MiB; output files never
allocated past the output cap; 0 set-id bits; AF_VSOCK refused; ponder's RSS bounded (<= 2 x the output cap + 32 MiB
above its baseline); nothing left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib
import json
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from pathlib import Path

import ponder
import ponder.engine.base

ROOT = Path(__file__).resolve().parents[2]  # the repository

MiB = 1 << 20
SAMPLE_S = 0.02
# Below the 512 MiB the shared-memory attack makes, so that what the host holds beyond the run's memory limit shows.
MEMORY_MB = 256
HOLD = "import time; time.sleep(1.5)  # holds what it made while the host is sampled"

ATTACKS = {
    "sysv_shm": f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        made = 0
        while made < 512 << 20:  # 64 MiB segments, each filled and detached: its pages stay in the segment
            segment = libc.shmget(0, 64 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
            if segment < 0:
                print("shmget:", os.strerror(ctypes.get_errno())); break
            address = libc.shmat(segment, None, 0)
            ctypes.memset(address, 1, 64 << 20)
            libc.shmdt(ctypes.c_void_p(address))
            made += 64 << 20
        print("shm made", made)
        {HOLD}
    """,
    "xattr": f"""
        import os
        open("/tmp/x", "w").close()
        value, made = bytes(60_000), 0
        try:
            while made < 256 << 20:
                os.setxattr("/tmp/x", f"user.{{made}}", value)
                made += len(value)
        except OSError as exc:
            print("setxattr:", exc)
        print("xattr made", made)
        {HOLD}
    """,
    "inode_flood": f"""
        import os
        made = 0
        try:
            while made < 300_000:
                os.mkdir(f"/tmp/d{{made}}")
                made += 1
        except OSError as exc:
            print("mkdir:", exc)
        print("directories made", made)
        {HOLD}
    """,
    "fallocate_keep_size": f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        status = libc.fallocate(1, 1, ctypes.c_long(0), ctypes.c_long(512 << 20))  # FALLOC_FL_KEEP_SIZE
        print("fallocate:", os.strerror(ctypes.get_errno()) if status else "allocated", flush=True)
        {HOLD}
    """,
    "insert_range": """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        os.write(1, b"x" * 4096)
        status = libc.fallocate(1, 0x20, ctypes.c_long(0), ctypes.c_long(128 << 20))  # FALLOC_FL_INSERT_RANGE
        os.write(2, f"insert range: {os.strerror(ctypes.get_errno()) if status else 'inserted'}".encode())
    """,
    "setid_output": f"""
        import os
        for fd in (1, 2):
            try:
                os.fchmod(fd, 0o6777)
                print("fchmod", fd, "done", flush=True)
            except OSError as exc:
                print("fchmod", fd, exc, flush=True)
        {HOLD}
    """,
    "socket_families": """
        import socket
        for name in ("AF_VSOCK", "AF_PACKET", "AF_NETLINK", "AF_INET", "AF_UNIX"):
            try:
                sock = socket.socket(getattr(socket, name), socket.SOCK_DGRAM if name == "AF_NETLINK" else
                                     socket.SOCK_RAW if name == "AF_PACKET" else socket.SOCK_STREAM)
                if name == "AF_VSOCK":
                    sock.bind((socket.VMADDR_CID_ANY, 5000)); sock.listen()
                print(name, "created")
            except OSError as exc:
                print(name, "refused:", exc.strerror)
    """,
}


def sandbox_at(rev: str | None) -> types.ModuleType:
    """The sandbox module as it is, or as it was at git revision ``rev`` (its sandbox files, with today's rest): since
    issue 31 ``ponder/programs/`` (imported as ``ponder_at_rev.programs.sandbox``), before it ``ponder/sandbox*.py``
    (imported as ``ponder_at_rev.sandbox``)."""
    if rev is None:
        return importlib.import_module("ponder.programs.sandbox")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "ponder/"], check=True,
                           capture_output=True, text=True).stdout.split()
    packaged = any(path.startswith("ponder/programs/") for path in files)
    wanted = [path for path in files if path.startswith("ponder/programs/")] if packaged else \
        [path for path in files if path.count("/") == 1 and Path(path).name.startswith("sandbox")]
    directory = Path(tempfile.mkdtemp(prefix="ponder-bench-rev-"))
    atexit.register(shutil.rmtree, directory)
    for path in wanted:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout
        Path(directory, path.removeprefix("ponder/")).parent.mkdir(parents=True, exist_ok=True)
        Path(directory, path.removeprefix("ponder/")).write_text(text)
    package = types.ModuleType("ponder_at_rev")
    package.__path__ = [str(directory), str(Path(ponder.__file__).parent)]  # the revision's files first
    sys.modules["ponder_at_rev"] = package
    sys.modules["ponder_at_rev.engine"] = ponder.engine
    sys.modules["ponder_at_rev.engine.base"] = ponder.engine.base
    return importlib.import_module("ponder_at_rev.programs.sandbox" if packaged else "ponder_at_rev.sandbox")


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[name].split()[0]) << 10 for name in ("Shmem", "Slab", "SUnreclaim", "MemAvailable")}


def own_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def output_files() -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob("ponder-sandbox-*/std*"))


class Sampler(threading.Thread):
    """Peaks, above the figures when it started, of what the host holds while one program runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base, self.base_rss = meminfo(), own_rss()
        self.peak = {"shmem": 0, "slab": 0, "sunreclaim": 0, "mem_available_drop": 0, "ponder_rss": 0,
                     "output_allocated": 0, "setid_output_files": 0}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        now = meminfo()
        allocated, setid = 0, 0
        for path in output_files():
            try:
                status = path.stat()
            except OSError:  # the run ended while we looked
                continue
            allocated += status.st_blocks * 512
            setid += bool(status.st_mode & (stat.S_ISUID | stat.S_ISGID))
        for name, value in (("shmem", now["Shmem"] - self.base["Shmem"]), ("slab", now["Slab"] - self.base["Slab"]),
                            ("sunreclaim", now["SUnreclaim"] - self.base["SUnreclaim"]),
                            ("mem_available_drop", self.base["MemAvailable"] - now["MemAvailable"]),
                            ("ponder_rss", own_rss() - self.base_rss), ("output_allocated", allocated),
                            ("setid_output_files", setid)):
            self.peak[name] = max(self.peak[name], value)

    def stop(self) -> dict[str, int]:
        self.stopping.set()
        self.join()
        self.sample()
        return self.peak


async def measure(sandbox: types.ModuleType) -> dict:
    limits = sandbox.Limits(memory_mb=MEMORY_MB)
    figures = {"limits": {"memory_mb": limits.memory_mb, "output_kb": limits.output_kb,
                          "scratch_mb": limits.scratch_mb}}
    for name, code in ATTACKS.items():
        sampler = Sampler()
        sampler.start()
        start = time.monotonic()
        try:
            outcome = await sandbox.run_python(textwrap.dedent(code), limits)
            result = {"returncode": outcome.returncode, "timed_out": outcome.timed_out,
                      "stdout_bytes_read": len(outcome.stdout), "stderr_bytes_read": len(outcome.stderr),
                      "says": (outcome.stdout[:200] + outcome.stderr[-200:]).strip()}
        except BaseException as exc:  # what ponder itself raised (the MemoryError of the issue)
            result = {"ponder_raised": f"{type(exc).__name__}: {exc}"[:300]}
        result["wall_s"] = round(time.monotonic() - start, 2)
        peaks = sampler.stop()
        result.update({f"{key}_mib" if key != "setid_output_files" else key:
                       round(value / MiB, 1) if key != "setid_output_files" else value for key, value in peaks.items()})
        figures[name] = result
        print(f"{name:20s} {json.dumps(result)}", flush=True)
    figures["left_behind"] = left_behind()
    print(f"left behind: {figures['left_behind']}")
    return figures


def left_behind() -> dict[str, int]:
    ipc = 0
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            ipc += len(f.readlines()) - 1
    cgroups = [path for root in Path("/sys/fs/cgroup").rglob("ponder-sandbox-*") if (path := root).is_dir()]
    processes = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            processes += b"/sandbox/main.py" in cmdline.read_bytes()
        except OSError:
            pass
    return {"temporary_directories": len(list(Path(tempfile.gettempdir()).glob("ponder-sandbox-*"))),
            "cgroups": len(cgroups), "host_ipc_objects": ipc, "sandbox_processes": processes}


def targets(figures: dict) -> dict[str, bool]:
    memory_limit = figures["limits"]["memory_mb"]
    output_cap = figures["limits"]["output_kb"] / 1024
    runs = [figures[name] for name in ATTACKS]
    return {
        "host memory per run <= memory limit + 10 %": all(run["shmem_mib"] <= 1.1 * memory_limit for run in runs),
        "slab growth <= 256 MiB": all(run["slab_mib"] <= 256 for run in runs),
        "output files never allocated past the cap": all(run["output_allocated_mib"] <= output_cap for run in runs),
        "0 set-id bits": all(run["setid_output_files"] == 0 for run in runs),
        "AF_VSOCK refused": "AF_VSOCK created" not in figures["socket_families"].get("says", ""),
        "ponder RSS bounded": all("ponder_raised" not in run and run["ponder_rss_mib"] <= 2 * output_cap + 32
                                  for run in runs),
        "nothing left behind": not any(figures["left_behind"].values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default=None, help="measure the sandbox as it was at this git revision")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    figures = asyncio.run(measure(sandbox_at(args.rev)))
    figures["targets"] = targets(figures)
    for name, met in figures["targets"].items():
        print(f"  {'met    ' if met else 'MISSED '} {name}")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rev": args.rev, **figures}, indent=2) + "\n")
    return 0 if all(figures["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
