"""Performance benchmarks: how fast the engine and what sits around it run on this machine.

Batched branches against sequential completions (``bench_engine``), the KV cache's layout (``bench_kv``), the prefix
cache across requests (``bench_prefix``), thread counts beside other programs (``bench_threads``), weight formats
(``bench_quant``), speculative decoding (``bench_speculative``), llama.cpp builds (``bench_builds``, which runs
``raw_decode`` in each build's own virtualenv), the cost of reading hidden states (``bench_hidden``), ``ponder serve``'s
concurrency and HTTP overhead (``bench_server``), ponder through llama.cpp's ``llama-server`` against in process
(``bench_llama_server``) and the sandbox's overhead per program (``bench_sandbox``). Results go to
``benchmarks/results/performance/``.
"""
