"""Per-token bookkeeping every engine shares (in-process, remote, fake), so that a branch means the same on each:

* ``record_token`` -- what a branch keeps of each sampled token beside its text: the log-probability, and with
  ``top_logprobs`` the top-k confidence and entropy;
* ``top_k_confidence`` -- DeepConf's token confidence, minus the mean of the top-k log-probabilities;
* ``top_k_entropy`` -- the entropy of the top-k alternatives renormalised (what a remote server's ``top_logprobs``
  allow too, so both engines report the same quantity: GlimpRouter thresholds it);
* ``matched_stop`` -- the stop-string window: whether the text a token (or a streamed chunk of tokens) added completed a
  stop string, looking back across token boundaries only as far as the longest stop string reaches;
* ``end_reason`` -- whether an extend ends after a token, and why, in one order for every engine.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Branch, SamplingParams, StopIf


def top_k_confidence(best_logprobs: Sequence[float] | np.ndarray) -> float:
    """Minus the mean log-probability of the k most likely tokens (DeepConf): high when the model is sure."""
    return float(-np.mean(best_logprobs))


def top_k_entropy(best_logprobs: Sequence[float] | np.ndarray) -> float:
    """Entropy (nats) of the k most likely tokens' distribution, renormalised to sum to one."""
    best = np.asarray(best_logprobs, dtype=np.float64)
    renormalised = best - np.logaddexp.reduce(best)
    return float(-(np.exp(renormalised) * renormalised).sum())


def record_token(branch: Branch, logprob: float | None, confidence: float | None, entropy: float | None) -> None:
    """Keep a sampled token's records that were asked for (None: not asked for)."""
    if logprob is not None:
        branch.token_logprobs.append(logprob)
    if confidence is not None:
        branch.confidences.append(confidence)
        branch.entropies.append(entropy)


def matched_stop(branch: Branch, stops: tuple[str, ...], text_start: int, added: int) -> bool:
    """Whether one of ``stops`` ends in the last ``added`` characters of ``branch.text`` (it may begin before them,
    but not before ``text_start``, where the extend began); sets ``branch.matched_stop`` to the first that does."""
    longest = max(len(s) for s in stops)
    window_start = max(text_start, len(branch.text) - added - longest + 1)
    for stop in stops:
        if branch.text.find(stop, window_start) >= 0:
            branch.matched_stop = stop
            return True
    return False


def end_reason(branch: Branch, params: SamplingParams, stop_if: StopIf | None, text_start: int, added: int,
               remaining: int | None) -> str | None:
    """Why an extend that began at ``text_start`` ends now that its branch's text grew by ``added`` characters:
    ``"stop"`` for a stop string (``matched_stop``), ``"length"`` when ``remaining`` (the tokens it may still
    generate; None where a remote server decides that) is 0, ``"halted"`` when ``stop_if`` says so; None goes on."""
    if params.stop and matched_stop(branch, params.stop, text_start, added):
        return "stop"
    if remaining == 0:
        return "length"
    if stop_if is not None and stop_if(branch):
        return "halted"
    return None
