"""A correctness probe for the fake engine's model that trusts answers of 7, and the fake hidden states it reads:
for the tests of the probe's uses (``sc``, ``bon``, ``mix``, the search scorer, ``auto``'s tie-break)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ponder.engine.fake import HIDDEN_SIZE
from ponder.probes import Probe

FAKE_SHA = "0" * 64  # every fake model's sha256


def knows_seven(context: str) -> list[float]:
    """A fake hidden state whose first number says whether the text answers 7."""
    return [1.0 if "boxed{7}" in context else 0.0] + [0.0] * (HIDDEN_SIZE - 1)


def install_seven_probe(directory: Path, monkeypatch) -> Path:
    """Save the probe into ``directory`` and point $PONDER_PROBES there."""
    weights = np.zeros(HIDDEN_SIZE)
    weights[0] = 5.0
    Probe("fake", FAKE_SHA, weights, -2.5).save(directory)
    monkeypatch.setenv("PONDER_PROBES", str(directory))
    return directory
