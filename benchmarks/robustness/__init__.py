"""Robustness benchmarks: whether ponder keeps its answers, its speed and the host's resources under stress.

Remote engines killed, stopped and failing mid-run (``bench_faults``), ``ponder serve`` under hostile clients
(``bench_hostile``), hostile programs in the sandbox (``bench_sandbox_hostile``) and the engine's speed after serving
a while (``bench_aging``). Results go to ``benchmarks/results/robustness/``.
"""
