"""Speculative decoding on the in-process engine: the draft model's proposals, their verification by modified
rejection sampling, and the settling of both models' KV cells afterwards.

Every branch of the target model has a *shadow* sequence in the draft model's context holding the same tokens. A
speculative step lets the draft propose ``k`` tokens for every extending branch (k draft decodes, all branches
batched), then the target verifies all proposals of all branches in one decode, and modified rejection sampling
(``sampling.speculative_choice``) keeps exactly the target's distribution: greedy output is the target's own token for
token. Rejected tokens are removed from both caches (``llama_memory_seq_rm`` from a position on). ``k`` adapts per
branch to its acceptance (up 2 when every proposal was kept, down 1 otherwise, as in Hugging Face's assisted
generation). The draft's KV is sized with a margin and not admitted separately: a shadow never holds more than its
target branch plus the proposals of one step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..sampling import Sample, describe, distribution, draw, sample, speculative_choice

if TYPE_CHECKING:  # annotations only: these modules import this one
    from .jobs import Extend, LlamaBranch, StepPlan
    from .runner import ModelRunner

DRAFT_K_START, DRAFT_K_MAX = 4, 12  # proposals per speculative step: the first, and the cap of the adaptation


def verify(rows: np.ndarray, drafted: list[int], q: list, job: Extend) -> list[Sample]:
    """The tokens a decode gives one branch: plain sampling from the first row, or the draft's proposals kept
    by modified rejection sampling, then the target's own correction (or, all kept, one bonus token)."""
    params, rng = job.params, job.branch.rng
    out = []
    for i, token in enumerate(drafted):
        choice = speculative_choice(distribution(rows[i], params), q[i], token, rng)
        if choice is not None:
            return out + [describe(rows[i], choice, params)]
        out.append(describe(rows[i], token, params))
    return out + [sample(rows[len(drafted)], params, rng)]


def propose(draft: ModelRunner, plan: StepPlan) -> list[tuple[list[int], list]]:
    """The proposals of the draft model ``draft`` for each decode of the target's ``plan``: k draft decodes, every
    branch in each. Returns per decode the drafted tokens and the draft distribution each was drawn from."""
    draft.context.apply_kv_ops(plan.draft_kv_ops)
    proposals = [([], []) for _ in plan.decodes]
    for r in range(max(plan.drafts)):
        items, who = [], []
        for j, (job, k) in enumerate(zip(plan.decodes, plan.drafts)):
            if r >= k:
                continue
            b, shadow = job.branch, job.branch.shadow
            # First round: the tokens the shadow has not evaluated yet, then the target's pending token.
            new = [*b.draft_behind, b.pending] if r == 0 else [proposals[j][0][-1]]
            start = shadow.n_past + (0 if r == 0 else len(b.draft_behind) + r)
            items += [(token, start + i, shadow.seq_id, i == len(new) - 1) for i, token in enumerate(new)]
            who.append(j)
        logits = draft.context.decode(items)
        for row, j in enumerate(who):
            job = plan.decodes[j]
            q = distribution(logits[row], job.params)
            token = int(q[0][0]) if q[0].size == 1 else draw(*q, job.branch.rng)
            proposals[j][0].append(token)
            proposals[j][1].append(q)
    return proposals


def settle(target: ModelRunner, b: LlamaBranch, start: int, entered: list[int], drafted: int, accepted: int) -> None:
    """After a speculative step of ``b`` (a branch of ``target``) that began with ``start`` tokens in its cells and
    put ``entered`` into them: drop the target's and the draft's cells past what was kept, remember what the draft
    has yet to evaluate, adapt k, count."""
    draft, shadow = target.draft, b.shadow
    target.kv_ops.append(("rm_from", b.seq_id, b.n_past))  # the target wrote start .. start + drafted
    backlog = b.draft_behind + entered  # the target's tokens at positions shadow.n_past .. b.n_past - 1
    # The shadow wrote its backlog, the pending token and drafted - 1 proposals: keep what the target kept.
    written_to = start + drafted if drafted else shadow.n_past
    keep = min(b.n_past, written_to)
    draft.kv_ops.append(("rm_from", shadow.seq_id, keep))
    grown = keep - shadow.n_past
    shadow.n_past = keep
    shadow.segment.cells += grown
    draft.cells_used += grown
    b.draft_behind = backlog[grown:]
    if drafted:
        b.draft_k = min(DRAFT_K_MAX, b.draft_k + 2) if accepted == drafted else max(1, b.draft_k - 1)
        b.usage.add("drafted_tokens", drafted, draft.model.name)
        b.usage.add("accepted_tokens", accepted, draft.model.name)
