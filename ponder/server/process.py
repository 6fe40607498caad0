"""A server run as a child process on 127.0.0.1: started, waited for until it answers, stopped.

The benchmarks and the real-server tests start ``ponder serve`` and llama-cpp-python's server this way::

    port = free_port()
    with ServerProcess([sys.executable, "-m", "ponder.cli", "serve", "--port", str(port)], port) as server:
        httpx.get(f"{server.url}/health")
"""

from __future__ import annotations

import socket
import subprocess
import time

import httpx

from ..engine.base import PonderError


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``command`` as a child process serving on ``port`` of 127.0.0.1; ready once ``GET ready_path`` answers 200.

    Leaving the ``with`` block (or ``stop()``) sends SIGTERM and, if the server has not exited ``stop_timeout_s``
    later, SIGKILL: a stuck server never outlives its user.
    """

    def __init__(self, command: list[str], port: int, *, ready_path: str = "/health", timeout_s: float = 120,
                 stop_timeout_s: float = 30, env: dict[str, str] | None = None, cwd: str | None = None,
                 quiet: bool = True):
        self.command = command
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.timeout_s = timeout_s
        self.stop_timeout_s = stop_timeout_s
        output = subprocess.DEVNULL if quiet else None
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=output)

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise PonderError(f"{self.command[:4]} exited with status {self.process.returncode} before serving "
                                  f"on {self.url}")
            if time.monotonic() > deadline:
                raise PonderError(f"{self.command[:4]} did not answer on {self.url} within {self.timeout_s:.0f} s")
            time.sleep(0.25)

    def stop(self) -> int:
        """Stop the server; its exit status (negative: killed by that signal)."""
        return terminate(self.process, self.stop_timeout_s)


def terminate(process: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM ``process``, SIGKILL it if it has not exited within ``timeout_s``; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
