"""Does the installed llama.cpp run on this CPU? Asked once per library, CPU and model, in a child process.

A llama.cpp library can die with SIGILL inside its first ``llama_decode``, and no Python handler survives that:

* a wheel compiled for another CPU (``-march=native`` is llama-cpp-python's default; pip caches the wheel, and a cache
  shared between machines hands it to a CPU without those instructions);
* llama.cpp's AMX kernels, which a native build enables wherever the CPU advertises AMX, fault on some hosts that
  advertise it (a virtual machine of this project's kind: ``tilezero`` raises #UD in a worker thread although the
  kernel granted the tile state).

So before a model first loads, a child process loads the same model with the same library and decodes a short batch
(a prompt, then several sequences at once: the matrix-matrix and matrix-vector kernels both run). If the child dies,
a second child tries again without llama.cpp's extra weight buffers (AMX and repacked layouts): where that runs,
ponder loads every model that way, slower by what the repacked layouts gain but correct. Where neither runs, the
library is unusable here and ``LlamaCpuError`` says so in one line with the one command that rebuilds it.

The verdict is cached in ``$PONDER_HOME/llama-cpu-check.json``, keyed by the library files (name, size, mtime), the
CPU (model name and feature flags) and the model file; a rebuilt library or another machine asks again. A check costs
one model load and a few decodes (about a second for the bundled 0.5B).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .base import PonderError
from .home import ponder_home

CHECK_TIMEOUT_S = 300.0  # a cold 1.5B load from a slow disk stays well inside this

# The child: load the model, evaluate a 48-token prompt, copy it to 4 sequences and decode all 4 twice. Exits 0 when
# every decode returned; a CPU that lacks an instruction the library uses kills it with SIGILL before that.
_CHILD = r"""
import ctypes, os, sys
import llama_cpp as llama

@llama.llama_log_callback
def silent(level, text, user_data):
    pass

llama.llama_log_set(silent, ctypes.c_void_p(0))
path, extra_buffers = sys.argv[1], sys.argv[2] == "1"
llama.llama_backend_init()
mparams = llama.llama_model_default_params()
mparams.use_extra_bufts = extra_buffers
model = llama.llama_model_load_from_file(path.encode(), mparams)
if not model:
    sys.exit(3)
n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
cparams = llama.llama_context_default_params()
cparams.n_ctx, cparams.n_seq_max, cparams.kv_unified = 256, 4, True
cparams.n_batch = cparams.n_ubatch = 64
cparams.n_threads = cparams.n_threads_batch = int(sys.argv[3])
ctx = llama.llama_init_from_model(model, cparams)
if not ctx:
    sys.exit(3)
batch = llama.llama_batch_init(64, 0, 1)

def decode(items):
    batch.n_tokens = len(items)
    for i, (token, pos, seq) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
        batch.seq_id[i][0] = seq
    if llama.llama_decode(ctx, batch) != 0:
        sys.exit(3)

prompt = [(100 + 7 * i) % n_vocab for i in range(48)]
decode([(t, p, 0) for p, t in enumerate(prompt)])
for seq in range(1, 4):
    llama.llama_memory_seq_cp(llama.llama_get_memory(ctx), 0, seq, -1, -1)
for step in range(2):
    decode([(200 + seq, len(prompt) + step, seq) for seq in range(4)])
"""


class LlamaCpuError(PonderError):
    """The installed llama.cpp library cannot run on this CPU."""


def library_dir() -> Path:
    """Where llama-cpp-python keeps its shared libraries, found without importing it (the import may be what
    crashes)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise PonderError("llama-cpp-python is not installed: pip install -e . (in ponder's directory) installs it")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "isa")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def _check_key(model_path: str) -> str:
    files = sorted(p for p in library_dir().glob("*.so*") if p.is_file())
    identity = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    model = Path(model_path).resolve()
    stat = model.stat()
    text = json.dumps([identity, _cpu_identity(), str(model), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _verdict_file() -> Path:
    return ponder_home() / "llama-cpu-check.json"


def _read_verdicts() -> dict:
    try:
        return json.loads(_verdict_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_verdict(key: str, verdict: dict) -> None:
    path = _verdict_file()
    verdicts = _read_verdicts()
    verdicts[key] = verdict
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(verdicts, indent=1) + "\n")
    os.replace(tmp, path)


def child_command(model_path: str, extra_buffers: bool, threads: int) -> list[str]:
    """The command line of one check (the tests replace it with a child that dies on purpose)."""
    return [sys.executable, "-c", _CHILD, model_path, "1" if extra_buffers else "0", str(threads)]


def _run_child(model_path: str, extra_buffers: bool, threads: int) -> int | None:
    """The child's return code (negative: killed by that signal), or None if it did not finish in time."""
    try:
        return subprocess.run(child_command(model_path, extra_buffers, threads), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=CHECK_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        return None


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def rebuild_command() -> str:
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "0.3.36"
    return (f'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir --no-deps '
            f'llama-cpp-python=={version}')


def use_extra_buffers(model_path: str, *, threads: int | None = None) -> bool:
    """Whether ``model_path`` may load with llama.cpp's extra weight buffers on this CPU; raises ``LlamaCpuError``
    if the library cannot run it at all. The first call per library, CPU and model asks a child; later calls read
    the cached verdict."""
    key = _check_key(model_path)
    verdict = _read_verdicts().get(key)
    if verdict is not None:
        return verdict["extra_buffers"]
    threads = threads or os.cpu_count() or 1
    deaths = []
    for extra_buffers in (True, False):
        code = _run_child(model_path, extra_buffers, threads)
        if code is not None and code >= 0:
            # Exit 0: it ran. Another exit code is no CPU problem (a broken file, too little memory): the load in
            # this process reports it in its own words, so it is not cached.
            if code == 0:
                _write_verdict(key, {"extra_buffers": extra_buffers, "model": model_path,
                                     "checked": time.strftime("%Y-%m-%d %H:%M:%S")})
            return extra_buffers
        if code is None:  # no verdict within the time: do not block the user on the check itself
            return extra_buffers
        deaths.append(_signal_name(code))
    if deaths[0] == "SIGILL":
        cause = ("illegal instruction: it was compiled for another CPU, e.g. a wheel from a pip cache shared "
                 "between machines")
    else:
        cause = "a crash, not only with extra buffers"
    raise LlamaCpuError(
        f"the installed llama.cpp ({library_dir()}) cannot run on this CPU: a test decode of "
        f"{Path(model_path).name} died with {deaths[0]} ({cause}); rebuild it for any x86-64 with AVX2: "
        f"{rebuild_command()}")


def describe() -> str:
    """One line per model checked with the installed library on this CPU, for ``ponder models``."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
        lines = [f"llama.cpp: llama-cpp-python {version}, {library_dir()}"]
    except (importlib.metadata.PackageNotFoundError, PonderError) as exc:
        return f"llama.cpp: {exc}"
    for key, verdict in _read_verdicts().items():
        model = verdict.get("model", "")
        if Path(model).is_file() and _check_key(model) == key:
            how = ("runs with its extra weight buffers" if verdict["extra_buffers"] else
                   "runs without its extra weight buffers (its AMX or repacked kernels died on this CPU)")
            lines.append(f"  {Path(model).name}: {how} (checked {verdict.get('checked', '?')})")
    if len(lines) == 1:
        lines.append("  not checked on this CPU yet (happens before a model first loads)")
    return "\n".join(lines)
