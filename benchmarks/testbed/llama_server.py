"""llama.cpp's own C++ server (``llama-server``) in the test bed: built once from registry sources, started, stopped.

``llama-server`` is the closest CPU stand-in for vLLM/SGLang: N parallel slots decoded in one batch (continuous
batching) and a prompt cache per slot. It is a test and benchmark tool here, never shipped with ponder; no llama.cpp
code is committed. The sources are the llama.cpp tree vendored in llama-cpp-python's sdist (the version ponder pins,
MIT licence), which ``pip download`` fetches from PyPI::

    python -m benchmarks.testbed.llama_server build            # once: about 10 min on 2 cores, cached
    python -m benchmarks.testbed.llama_server serve --parallel 8   # the bundled model on a free port of 127.0.0.1

The build is portable (``GGML_NATIVE=OFF``: AVX2/FMA/F16C, no AMX — a native build's AMX kernels die with SIGILL on
some hosts) and makes only the ``llama-server`` target, statically linked, without the web UI, tests or examples. It
lands in ``~/.cache/ponder/llama-server/<llama-cpp-python version>/bin/llama-server``; ``PONDER_LLAMA_SERVER`` names
another binary instead.

``build`` (and ``path``) must keep running without ponder installed: ``.ci/run`` builds the server before the test
extras are installed, so this module imports nothing of ponder at the top; ``LlamaServer`` imports it only when it
starts a server.

In Python (the tests' fixture and the benchmarks)::

    from benchmarks.testbed.llama_server import LlamaServer
    with LlamaServer(parallel=4) as server:        # waits for /health
        server.url                                 # http://127.0.0.1:PORT  (OpenAI API under /v1)
        server.kill(); server.restart()            # fault injection: SIGKILL, then the same port again
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",          # portable: no AMX, no AVX-512 (SIGILL risk), AVX2/FMA/F16C on
    "-DBUILD_SHARED_LIBS=OFF",    # one self-contained binary
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",       # no npm
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download of the UI at build time
    "-DLLAMA_OPENSSL=OFF",        # plain HTTP on 127.0.0.1 only
    "-DGGML_OPENMP=OFF",          # ggml's own thread pool: no libgomp spinning between requests
]


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ponder" / "llama-server" / LLAMA_CPP_PYTHON_VERSION


def binary_path() -> Path:
    """Where the built (or ``PONDER_LLAMA_SERVER``-named) binary is; it may not exist yet."""
    override = os.environ.get("PONDER_LLAMA_SERVER")
    return Path(override) if override else cache_dir() / "bin" / "llama-server"


def find_binary() -> Path | None:
    path = binary_path()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def unavailable_reason() -> str | None:
    """None if llama-server is built; otherwise why not, for pytest's skip."""
    if find_binary():
        return None
    return (f"llama-server is not built ({binary_path()} missing): "
            f"run `python -m benchmarks.testbed.llama_server build` "
            f"(needs cmake and a C++ compiler, about 10 min on 2 cores)")


def _sdist(workdir: Path, sdist: str | None) -> Path:
    candidates = [sdist, os.environ.get("PONDER_LLAMA_SDIST"), f"/tmp/wheels/sdist/{SDIST_NAME}"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(workdir)], check=True)
    return workdir / SDIST_NAME


def build(*, sdist: str | None = None, jobs: int = 2, force: bool = False, log=print) -> Path:
    """Build ``llama-server`` into the cache (nothing to do if it is there); its path."""
    target = cache_dir() / "bin" / "llama-server"
    if target.is_file() and not force:
        return target
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise RuntimeError(f"building llama-server needs {tool} on PATH")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-", dir=cache_dir()) as tmp:
        work = Path(tmp)
        archive = _sdist(work, sdist)
        log(f"extracting llama.cpp from {archive}")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDORED)]
            tar.extractall(work, members=members, filter="data")
        source = work / VENDORED
        build_dir = work / "build"
        started = time.monotonic()
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
                       check=True)
        built = build_dir / "bin" / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
        shutil.copy2(source / "LICENSE", target.parent / "LICENSE-llama.cpp")
        log(f"built {target} in {time.monotonic() - started:.0f} s")
    return target


class LlamaServer:
    """``llama-server`` with ``model`` on a free port of 127.0.0.1: ``parallel`` slots decoded together (continuous
    batching), ``ctx_per_slot`` tokens of context each in one unified KV cache, the prompt cache on. Served under the
    name ``alias`` (the bundled model's catalog name, as ``--model`` of ``ponder --engine openai`` expects).

    Started (and waited for until ``/health`` answers 200) by ``start()`` or ``with``; ``stop()`` sends SIGTERM, then
    SIGKILL after ``stop_timeout_s``. For fault injection: ``kill()`` (SIGKILL), ``pause()``/``resume()``
    (SIGSTOP/SIGCONT), ``restart()`` (the same port again). Its log goes to ``log_path`` (by default a temporary file,
    kept only if the ``with`` block ends in an error).
    """

    def __init__(self, model: str = "qwen2.5-0.5b", *, parallel: int = 4, ctx_per_slot: int = 2048, threads: int = 2,
                 port: int | None = None, alias: str | None = None, binary: str | Path | None = None,
                 extra: list[str] | None = None, timeout_s: float = 120, stop_timeout_s: float = 10,
                 log_path: str | Path | None = None):
        from ponder.models import CATALOG, resolve_model
        from ponder.server.process import free_port

        self.binary = Path(binary) if binary else find_binary()
        if self.binary is None:
            raise RuntimeError(unavailable_reason())
        self.model_path = resolve_model(model).path if model in CATALOG else str(model)
        self.alias = alias or (model if model in CATALOG else Path(model).stem)
        self.parallel = parallel
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.command = [
            str(self.binary), "--model", self.model_path, "--alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot), "--kv-unified",
            "--cont-batching", "--cache-prompt", "--threads", str(threads), "--threads-batch", str(threads),
            "--batch-size", "512", "--cache-ram", "256", "--no-webui", "--metrics", "--no-warmup",
            *(extra or []),
        ]
        self.timeout_s, self.stop_timeout_s = timeout_s, stop_timeout_s
        self.own_log = log_path is None  # a temporary file, removed when the ``with`` block ends without an error
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix=f"llama-server-{self.port}-", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if self.own_log and exc_type is None:
            self.log_path.unlink(missing_ok=True)

    def start(self) -> LlamaServer:
        import httpx

        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"llama-server on {self.url} is already running")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {self.process.returncode} before serving on "
                                   f"{self.url}; its log: {self.log_path}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama-server did not answer on {self.url} within {self.timeout_s:.0f} s; "
                                   f"its log: {self.log_path}")
            time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: in-flight connections are reset."""
        if self.running:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the process hangs; the kernel still accepts connections on its port, nobody answers them."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> LlamaServer:
        self.stop()
        return self.start()

    def stop(self) -> int | None:
        """Stop the server (resumed first if paused); its exit status, or None if it was never started."""
        if self.process is None:
            return None
        from ponder.server.process import terminate

        if self.process.poll() is None:
            self._signal(signal.SIGCONT)
        return terminate(self.process, self.stop_timeout_s)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters (``llamacpp:prompt_tokens_total``, ``llamacpp:tokens_predicted_total``,
        ``llamacpp:n_decode_total``, ...), as name -> value."""
        import httpx

        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    values[name] = float(value)
                except ValueError:
                    pass
        return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build llama-server into the cache (nothing to do if it is there)")
    b.add_argument("--sdist", help="llama-cpp-python's sdist (default: pip download it)")
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--force", action="store_true", help="build again even if cached")
    s = sub.add_parser("serve", help="serve the bundled model until Ctrl-C")
    s.add_argument("--model", default="qwen2.5-0.5b")
    s.add_argument("--parallel", type=int, default=4)
    s.add_argument("--ctx-per-slot", type=int, default=2048)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--port", type=int, default=None)
    sub.add_parser("path", help="print the binary's path (exit status 1 if not built)")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(sdist=args.sdist, jobs=args.jobs, force=args.force))
    elif args.command == "path":
        path = find_binary()
        print(path or unavailable_reason())
        sys.exit(0 if path else 1)
    else:
        with LlamaServer(args.model, parallel=args.parallel, ctx_per_slot=args.ctx_per_slot, threads=args.threads,
                         port=args.port) as server:
            print(f"llama-server serving {server.alias} at {server.base_url} ({args.parallel} slots); Ctrl-C stops it",
                  flush=True)
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
