"""ponder's benchmarks, by purpose; each script runs as a module from the repository root
(``python -m benchmarks.performance.bench_engine --help``). benchmarks/README.md is the index: per script what it
measures, its command, where its results go and where the findings are written up (docs/findings/).

* ``performance``: speed and cost of the engine and what sits around it (batched decode, KV layout, prefix cache,
  threads, weight formats, speculative decoding, llama.cpp builds, hidden states, the server, the sandbox).
* ``robustness``: whether it keeps working, and its speed, under faults, hostile input and long service.
* ``peers``: side by side with other inference-time compute systems (optillm, its_hub) through one counting proxy.
* ``analysis``: readings of recorded runs (``ponder bench`` results files); they generate nothing.
* ``testbed``: tools the tests and benchmarks stand on (llama.cpp's ``llama-server``, built from source).
"""
