"""Side by side with optillm and its_hub: the benchmark (``bench_peers``, ``python -m benchmarks.peers.bench_peers``),
the counting proxy every system's requests go through (``counting_proxy``), the peers' own virtualenvs (``venvs``),
one runner per system (``runners``) and the script its_hub's runs execute (``its_hub_driver``).

Peers run only in their own virtualenvs (``venvs.py``), as servers or as small driver scripts executed by the
venv's python: ponder's environment never imports torch, optillm or its_hub.
"""
