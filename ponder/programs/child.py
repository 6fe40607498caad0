"""The first code the sandbox's interpreter runs:
``python -I -S -B child.py CPU_S ADDRESS_SPACE OPEN_FILES FILE_SIZE PROGRAM [IMPORT_DIR ...]``.

It lowers the resource limits, soft and hard alike (raising a hard limit again needs a capability the program does
not have), puts the IMPORT_DIRs on ``sys.path`` (the third-party packages the sandbox offers), and runs PROGRAM as
``__main__``. Standard library only, and no import of ``ponder``: ``-I -S`` keep everything else off ``sys.path``.
"""

import builtins
import resource
import runpy
import sys


def main() -> None:
    cpu_seconds, address_space, open_files, file_size = map(int, sys.argv[1:5])
    program, import_dirs = sys.argv[5], sys.argv[6:]
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, address_space),
                         (resource.RLIMIT_NOFILE, open_files), (resource.RLIMIT_FSIZE, file_size),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    sys.path.extend(import_dirs)
    builtins.exit = builtins.quit = sys.exit  # model programs call exit() now and then; -S skips the site module
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
