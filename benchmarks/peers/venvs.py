"""Each peer in its own virtualenv under ``benchmarks/peers/venvs/`` (ignored by git), installed on first use.

optillm 0.4.0 hard-depends on torch and on about 200 other packages, and a plain ``pip install optillm`` backtracks
for many minutes over a conflict (its ``adaptive-classifier`` -> ``optimum[onnxruntime]`` wants transformers < 4.58
while optillm wants >= 5). Only optillm's router plugin needs adaptive-classifier, so it is installed ``--no-deps``,
then its requirements read from its own metadata minus that one, with a CPU build of torch put in first (the default
one from PyPI carries CUDA libraries, gigabytes this machine cannot use). its_hub needs its ``lm`` extra for the
OpenAI client.

A venv is ready once ``installed.json`` is written (last step): it records the versions, the package count and the
size on disk, for the results. An install that was cut off is redone from scratch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

VENVS = Path(__file__).resolve().parent / "venvs"
TORCH_CPU = "torch==2.13.0+cpu"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str  # what a user installs
    distribution: str  # its name in importlib.metadata
    deps_without: tuple[str, ...] | None = None  # install --no-deps, then its requirements minus these
    reported: tuple[str, ...] = ()  # other distributions whose versions the results record


PEERS = {
    "optillm": Peer("optillm", "optillm==0.4.0", "optillm", deps_without=("adaptive-classifier",),
                    reported=("torch", "transformers", "openai")),
    "its_hub": Peer("its_hub", "its-hub[lm]==1.2.0", "its_hub", reported=("openai",)),
}


@dataclass(frozen=True)
class Venv:
    peer: Peer
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, command: str) -> Path:
        return self.path / "bin" / command

    @property
    def installed(self) -> dict:
        return json.loads((self.path / "installed.json").read_text())


def ensure_venv(name: str, log=print) -> Venv:
    """The peer's venv, installed first if it is not ready."""
    peer = PEERS[name]
    venv = Venv(peer, VENVS / name)
    if (venv.path / "installed.json").exists():
        return venv
    if venv.path.exists():
        shutil.rmtree(venv.path)  # a cut-off install
    log(f"installing {peer.requirement} into {venv.path} (first use; optillm takes many minutes)")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv.path)], check=True)
    pip = [str(venv.python), "-m", "pip", "install", "--quiet"]
    if peer.deps_without is None:
        subprocess.run([*pip, peer.requirement], check=True)
    else:
        _install_torch_cpu(pip)
        subprocess.run([*pip, "--no-deps", peer.requirement], check=True)
        subprocess.run([*pip, *_requirements(venv, peer)], check=True)
    record = {"install_s": round(time.monotonic() - started, 1), **_describe(venv)}
    (venv.path / "installed.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"installed {name}: {record}")
    return venv


def _install_torch_cpu(pip: list[str]) -> None:
    """A CPU build of torch: from pip's configured sources when one has it, else from PyTorch's CPU index."""
    if subprocess.run([*pip, "--no-deps", TORCH_CPU]).returncode != 0:
        subprocess.run([*pip, "--no-deps", "--index-url", TORCH_CPU_INDEX, TORCH_CPU], check=True)


def _requirements(venv: Venv, peer: Peer) -> list[str]:
    """The peer's own requirements (not its extras'), minus ``peer.deps_without``."""
    script = ("import importlib.metadata as m, sys; "
              f"print('\\n'.join(r for r in m.requires({peer.distribution!r}) or [] if 'extra ==' not in r))")
    listed = subprocess.run([str(venv.python), "-c", script], check=True, capture_output=True, text=True).stdout
    dropped = {name.lower() for name in peer.deps_without or ()}
    return [r for r in listed.split("\n") if r and _name(r) not in dropped]


def _name(requirement: str) -> str:
    for i, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:i].lower()
    return requirement.lower()


def _describe(venv: Venv) -> dict:
    script = ("import importlib.metadata as m, json, sys; names = sys.argv[1:]; "
              "print(json.dumps({'versions': {n: m.version(n) for n in names}, "
              "'packages': sum(1 for _ in m.distributions())}))")
    names = [venv.peer.distribution, *venv.peer.reported]
    described = json.loads(subprocess.run([str(venv.python), "-c", script, *names], check=True,
                                          capture_output=True, text=True).stdout)
    size = sum(f.stat().st_size for f in venv.path.rglob("*") if f.is_file() and not f.is_symlink())
    return {**described, "size_mb": round(size / 2**20)}
