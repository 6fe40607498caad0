"""Correctness probes: a linear read-out of a model's final hidden state that predicts "this branch's answer is right"
(issue 33; LiLaVe, arXiv 2504.16760; "Hidden error awareness in CoT", arXiv 2605.09502).

A probe belongs to one model file: it is stored as ``<sha256 of the GGUF>.json`` and refuses to score for another
model. The file is JSON (a few tens of kilobytes)::

    {"ponder_probe": 1, "model": "qwen2.5-1.5b", "sha256": "cc32...", "hidden_size": 1536,
     "weights": [...hidden_size floats...], "bias": -0.3, "trained": {...data, C, metrics, command...}}

and the score of a hidden state ``h`` is ``sigmoid(weights . h + bias)`` (the standardisation of training is folded
into ``weights`` and ``bias``). Probes for the bundled models ship in this package (``ponder/probes/*.json``);
``ponder probe train`` (``ponder.probes.train``) remakes them from recorded runs. ``$PONDER_PROBES`` names a
directory searched first (probes of your own models, or retrained ones).

Uses (each reads ``await branch.hidden()``, free on branches sampled with ``SamplingParams(hidden=True)`` that ended
at end-of-generation, one token otherwise):

* ``probe_score(branch)`` -- the probability that the branch's answer is right: the ``probe`` verifier of ``bon``,
  the ``hidden`` step scorer of the search strategies, and the call for an adaptive policy (stopping, tie-breaks).
* ``kept_score(branch)`` -- the same from the vector an extend with ``hidden=True`` kept, without the engine: for a
  finished (even released) branch, as the ``probe`` vote weighting of ``sc`` reads it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.base import Branch, ModelInfo, PonderError

PROBE_FORMAT = 1
PACKAGE_DIR = Path(__file__).resolve().parent
PROBES_ENV = "PONDER_PROBES"


class ProbeError(PonderError):
    """A probe file that is missing, unreadable or made for another model."""


@dataclass
class Probe:
    model: str
    sha256: str
    weights: np.ndarray  # float64, hidden_size
    bias: float
    trained: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return len(self.weights)

    def logit(self, hidden) -> float:
        h = np.asarray(hidden, dtype=np.float64)
        if h.shape != self.weights.shape:
            raise ProbeError(f"the probe for {self.model} reads vectors of {self.hidden_size} numbers, got {h.shape}")
        return float(h @ self.weights + self.bias)

    def score(self, hidden) -> float:
        """P(right) of a branch whose final hidden state is ``hidden``."""
        z = self.logit(hidden)
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        z = np.asarray(matrix, dtype=np.float64) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -700, 700)))

    def to_dict(self) -> dict:
        return {"ponder_probe": PROBE_FORMAT, "model": self.model, "sha256": self.sha256,
                "hidden_size": self.hidden_size, "bias": float(self.bias),
                "weights": [float(f"{w:.6g}") for w in self.weights], "trained": self.trained}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":  # a directory: the file is named by the model's sha256
            path = path / f"{self.sha256}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> Probe:
        """The probe in ``path``; with ``sha256``, refuse one made for another model file. Any problem is one
        ``ProbeError`` line naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProbeError(f"no probe file {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProbeError(f"{path} is not a probe file (not readable JSON: {exc})") from None
        try:
            if not isinstance(data, dict) or data.get("ponder_probe") != PROBE_FORMAT:
                raise ValueError(f"not a ponder probe of format {PROBE_FORMAT}")
            weights = np.asarray(data["weights"], dtype=np.float64)
            if weights.ndim != 1 or len(weights) != int(data["hidden_size"]) or not np.all(np.isfinite(weights)):
                raise ValueError(f"its weights are not {data['hidden_size']} finite numbers")
            bias = float(data["bias"])
            if not math.isfinite(bias):
                raise ValueError("its bias is not a finite number")
            probe = cls(model=str(data["model"]), sha256=str(data["sha256"]), weights=weights, bias=bias,
                        trained=dict(data.get("trained") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ProbeError(f"{path} is not a valid probe file: {detail}") from None
        if sha256 is not None and probe.sha256 != sha256:
            raise ProbeError(f"{path} is a probe for {probe.model} (sha256 {probe.sha256[:12]}…), not for the model "
                             f"with sha256 {sha256[:12]}…: retrain it with `ponder probe train`")
        return probe


def probe_dirs() -> list[Path]:
    extra = os.environ.get(PROBES_ENV)
    return ([Path(extra)] if extra else []) + [PACKAGE_DIR]


_loaded: dict[tuple[str, str], Probe] = {}


def probe_for(model: ModelInfo) -> Probe:
    """The probe of ``model`` (by its sha256), from ``$PONDER_PROBES`` or the package; loaded once."""
    if not model.sha256:
        raise ProbeError(f"{model.name} has no known sha256, so no probe can be matched to it")
    for directory in probe_dirs():
        path = directory / f"{model.sha256}.json"
        if path.is_file():
            key = (str(path), model.sha256)
            if key not in _loaded:
                _loaded[key] = Probe.load(path, model.sha256)
            return _loaded[key]
    raise ProbeError(f"no correctness probe for {model.name} (sha256 {model.sha256[:12]}…): train one with "
                     f"`ponder probe train` and put it in ${PROBES_ENV}")


def branch_model(branch: Branch) -> ModelInfo:
    """The ModelInfo of the model ``branch`` lives on."""
    engine = branch.engine
    info = getattr(engine, "model_info", None)
    if info is not None:
        return info(branch.model or None)
    if branch.model in ("", engine.model.name):
        return engine.model
    raise ProbeError(f"cannot tell which model file {branch.model} is on this engine")


async def probe_score(branch: Branch) -> float:
    """P(right) of ``branch``'s answer according to its model's probe: reads the branch's final hidden state (free
    if its last extend had ``hidden=True`` and ended at end-of-generation, else one token). Raises ``ProbeError``
    without a probe for the model, ``HiddenUnsupportedError`` on an engine without hidden states."""
    probe = probe_for(branch_model(branch))
    return probe.score(await branch.hidden())


def kept_score(branch: Branch) -> float | None:
    """P(right) from the hidden state the branch's last extend kept (``hidden=True``), without the engine: usable
    on a released branch. None when it kept none. A branch that ended on a stop string or its token limit kept the
    state before its last token, one token short of ``probe_score``'s."""
    if branch.hidden_state is None:
        return None
    return probe_for(branch_model(branch)).score(branch.hidden_state)
