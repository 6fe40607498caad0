"""The probe verifier: the generating model's own correctness probe reads the candidate's final hidden state
(``ponder.probes``). No tokens are generated and, on candidates sampled with ``hidden=True`` that ended at
end-of-generation, none evaluated: the vector is the one the last decode computed. Needs an engine with hidden
states (the in-process one) and a probe trained for the model's file (shipped for both bundled models)."""

from __future__ import annotations

from ..engine.base import Branch
from ..probes import probe_score


class ProbeVerifier:
    wants_hidden = True  # best-of-N samples its candidates with SamplingParams(hidden=True): the reads are free

    async def score(self, question: str, candidate: Branch) -> float:
        return await probe_score(candidate)
