"""The benchmark harness behind ``ponder bench`` and ``ponder report``.

``datasets`` loads problems (JSONL, short names, reasoning-gym) and scores answers; ``runner`` runs a strategy over
them into a resumable results file; ``metrics`` computes accuracy, costs and the pass@k / maj@k curves; ``report``
compares results files as a table, a Pareto plot and Markdown; ``cli`` registers the two subcommands.
"""
