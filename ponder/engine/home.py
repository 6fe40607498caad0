"""Where ponder keeps its files: ``$PONDER_HOME``, by default ``~/.cache/ponder`` (the assembled models, the llama.cpp
CPU check's verdicts, this machine's tuned profile)."""

from __future__ import annotations

import os
from pathlib import Path


def ponder_home() -> Path:
    return Path(os.environ.get("PONDER_HOME") or Path.home() / ".cache" / "ponder")
