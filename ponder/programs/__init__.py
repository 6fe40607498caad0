"""Programs a model writes, as one block: reading them from a reply and their printed answer (``extraction``),
running them one per core at a time (``running``) in the sandbox (``sandbox``, with its seccomp filter in
``seccomp``, its cgroups in ``cgroup`` and the first code its interpreter runs in ``child``). ``pal``, ``mix`` and the
``program`` verifier read programs only through this package, so a program gives the same answer whichever of them
ran it.

This package exports the names its users need.
"""

from .extraction import printed_answer, program_in, program_of
from .running import run_program
from .sandbox import Limits, Outcome, run_python

__all__ = ["Limits", "Outcome", "printed_answer", "program_in", "program_of", "run_program", "run_python"]
