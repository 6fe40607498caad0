"""Test-bed tools the tests, benchmarks and CI stand on, not shipped with ponder: ``llama_server`` builds llama.cpp's
``llama-server`` from the sources vendored in llama-cpp-python's sdist and starts it (``python -m
benchmarks.testbed.llama_server build``).
"""
