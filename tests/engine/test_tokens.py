"""The per-token bookkeeping every engine shares (``ponder.engine.tokens``): one confidence and one entropy for the
in-process and the remote engine."""

from __future__ import annotations

import math
import numpy as np
import pytest
from openai.types.completion_choice import Logprobs

from ponder.engine import Usage, sampling
from ponder.engine.remote.engine import RemoteBranch, _record_logprobs
from ponder.engine.remote.transport import token_logprobs_of
from ponder.engine.tokens import top_k_confidence, top_k_entropy


def test_the_entropy_is_that_of_the_top_k_renormalised():
    assert top_k_entropy([math.log(0.25), math.log(0.25)]) == pytest.approx(math.log(2))
    assert top_k_entropy([math.log(0.9)]) == pytest.approx(0.0)
    assert top_k_confidence([-1.0, -3.0]) == pytest.approx(2.0)


@pytest.mark.parametrize("shape", ["completions", "chat"])
def test_remote_and_in_process_engines_record_the_same_confidence_and_entropy(shape):
    logits = np.array([2.0, 1.0, 0.5, -1.0, -4.0], dtype=np.float32)
    sample = sampling._with_logprobs(logits, float(logits.max()), 0, top_k=3)
    # What a server would return for that token: its logprob and the top alternatives', by token text, in the
    # completions API's shape (vLLM) or the chat API's (llama-server).
    logprobs = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64))
    alternatives = {f"t{i}": float(lp) for i, lp in enumerate(logprobs)}
    wire = ({"tokens": ["t0"], "token_logprobs": [float(logprobs[0])], "top_logprobs": [alternatives]}
            if shape == "completions" else
            {"content": [{"id": 0, "token": "t0", "logprob": float(logprobs[0]),
                          "top_logprobs": [{"id": i, "token": t, "logprob": lp}
                                           for i, (t, lp) in enumerate(alternatives.items())]}]})
    branch = RemoteBranch(engine=None, usage=Usage(), context_tokens=0, model="m")
    _record_logprobs(branch, token_logprobs_of(Logprobs.model_validate(wire)), 3)
    assert branch.token_logprobs == [pytest.approx(logprobs[0])]
    assert branch.confidences == [pytest.approx(sample.confidence)]
    assert branch.entropies == [pytest.approx(sample.entropy)]
