"""Analyses of recorded runs: each reads ``ponder bench`` results files (under ``benchmarks/results/``) and prints
figures about them, generating nothing.

``traces`` (what SC traces say about stopping early: confidence, settling, length; shared helpers for the others),
``early_exit_stats`` (answer probes against the plain run), ``specreason_stats`` (SpecReason's step scores),
``search_stats`` (step-search trees) and ``auto_stats`` (``auto``'s arms and stopping classes).
"""
