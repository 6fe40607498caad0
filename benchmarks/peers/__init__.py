"""Side by side with optillm and its_hub (``benchmarks/bench_peers.py``): the counting proxy every system's requests
go through, the peers' own virtualenvs, and one runner per system.

Peers run only in their own virtualenvs (``venvs.py``), as servers or as small driver scripts executed by the
venv's python: ponder's environment never imports torch, optillm or its_hub.
"""
