"""The first code the sandbox's child interpreter runs: ``python -I -B sandbox_child.py CPU AS NOFILE FSIZE program``.

It lowers the resource limits, installs an audit hook, then runs the program as ``__main__``. The hook refuses
network access, new processes, foreign code (ctypes), raising limits, signalling other processes, and any write,
rename, removal or mode change of a path outside the working directory. It is a guard against the accidents of
model-written code, not against code written to escape: the hard limits are the kernel's (rlimits, the process
group killed on timeout, and a network namespace where ``unshare -n`` is allowed).

Standard library only, and no import of ``ponder``: ``-I`` keeps the project off ``sys.path``.
"""

import os
import resource
import runpy
import sys

REFUSED_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                    "os.forkpty", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
                    "resource.prlimit", "sqlite3.")
ALLOWED = {"ctypes.dlopen"}  # numpy loads libraries through ctypes at import; calling into them stays refused
PATH_EVENTS = {  # event -> positions of its path arguments
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
    "shutil.copytree": (1,), "shutil.move": (0, 1),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def refused(event: str, args: tuple) -> bool:
    if event == "object.__setattr__":
        return args[1] == "__code__"  # rewriting a function's code could rewrite this hook
    return event.startswith(REFUSED_PREFIXES) and event not in ALLOWED


def guard(root: str):
    realpath, sep = os.path.realpath, os.sep

    def inside(path) -> bool:
        if isinstance(path, int):  # an open file descriptor: it was checked when it was opened
            return True
        resolved = realpath(os.fsdecode(path))
        return resolved == root or resolved.startswith(root + sep)

    def hook(event: str, args: tuple) -> None:
        if refused(event, args):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or bool(flags & WRITE_FLAGS)
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working directory")

    return hook


def main() -> None:
    cpu_seconds, address_space, open_files, file_size = map(int, sys.argv[1:5])
    program = sys.argv[5]
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, address_space),
                         (resource.RLIMIT_NOFILE, open_files), (resource.RLIMIT_FSIZE, file_size),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    sys.addaudithook(guard(os.path.realpath(os.getcwd())))
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
