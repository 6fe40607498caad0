"""Asking a model to judge: the one judge turn (``judge_turn``), the default judge model (``DEFAULT_JUDGE``), and P(Yes)
of its reply, which the outcome verifiers (``ponder.verifiers.llm``) and the step judge (``ponder.search.scorers``) read
the same way (``reply_p_yes``).

The score is P(Yes) / (P(Yes) + P(No)), read one of two ways:

* **exactly**, where the engine can ``score`` (the in-process engine: free, from the KV cells already computed):
  ``Branch.score`` gives the log-probability of each reply after the question, and the question's own log-probability
  cancels in the ratio. Costs the question and reply tokens twice as ``scored_tokens``.
* **from one generated token**, where ``score`` raises ``ScoreUnsupportedError`` (a remote server without usable
  prompt logprobs: llama-cpp-python 0.3, vLLM's chat API, some SGLang modes): the question is appended to a fork of
  the candidate (``prompt_tokens``) and one greedy token is generated with the top 20 alternatives
  (``generated_tokens``: it is a sampled token like any other; on the remote engine the append's request also
  generates the one token the API forces, counted there too). P(Yes) sums the alternatives whose text is "yes" in any
  case and spacing ("Yes", " Yes", "yes"), P(No) likewise. A reply missing from the top 20 is at most as likely as
  the least likely one listed, so it is taken at that bound: the score moves towards 0.5 as far as the evidence
  allows, never to a certain 0 or 1 it did not see. When neither reply is listed (the model starts some other
  answer), the score is ``NO_EVIDENCE`` = 0.5: both are below the 20th alternative and nothing orders them, so the
  candidate ranks between those judged correct and those judged wrong -- as the program verifier scores a solution it
  cannot check.
"""

from __future__ import annotations

import asyncio
import math

from ..engine.base import Branch, SamplingParams, ScoreUnsupportedError

DEFAULT_JUDGE = "qwen2.5-1.5b"  # the judge model of every judge (verifier, step scorer): the bundled large model


def judge_turn(question: str, reply_start: str = "") -> str:
    """The text that, appended to a branch in the assistant's turn, closes that turn, asks ``question`` as the user,
    and opens the assistant's reply with ``reply_start``: the judge turn of the step judges (``ponder.search.scorers``,
    SpecReason). Written in ChatML, the chat markup of both bundled models (Qwen2.5), which the engines' ``append``
    reads as the special tokens it names. The engines render whole chats through the model's chat template, but
    offer no way to render one turn in the middle of a branch; this is the one place that writes it."""
    return f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{reply_start}"


# One greedy token with as many alternatives as SamplingParams (and vLLM's default --max-logprobs) allow.
VERDICT = SamplingParams(temperature=0.0, max_tokens=1, top_logprobs=20)
NO_EVIDENCE = 0.5


def p_yes(yes_logprob: float, no_logprob: float) -> float:
    return 1.0 / (1.0 + math.exp(no_logprob - yes_logprob))


def p_yes_from_alternatives(alternatives: dict[str, float]) -> float:
    """P(Yes) / (P(Yes) + P(No)) from the top-k alternatives of a reply's first token (see the module docstring)."""
    yes = [lp for token, lp in alternatives.items() if token.strip().lower() == "yes"]
    no = [lp for token, lp in alternatives.items() if token.strip().lower() == "no"]
    if not yes and not no:
        return NO_EVIDENCE
    least_listed = min(alternatives.values())
    return p_yes(_logsumexp(yes) if yes else least_listed, _logsumexp(no) if no else least_listed)


def _logsumexp(logprobs: list[float]) -> float:
    top = max(logprobs)
    return top + math.log(sum(math.exp(lp - top) for lp in logprobs))


async def read_verdict(asked: Branch) -> float:
    """Generate the first token of the reply on ``asked`` (a branch that ends with the question) and read P(Yes)
    from its alternatives."""
    await asked.extend(VERDICT)
    return p_yes_from_alternatives(asked.last_top_logprobs)


async def reply_p_yes(branch: Branch, asked: str = "", replies: tuple[str, str] = ("Yes", "No")) -> float:
    """P(Yes) of the reply that would follow ``asked`` appended to ``branch`` (by default ``branch`` itself ends
    where the reply starts): from the scores of the two one-token ``replies`` (as they are written after ``asked``),
    or, on an engine that cannot score, from the first generated token's alternatives -- ``asked`` then goes on a fork,
    and ``branch`` stays as it was."""
    try:
        yes, no = await asyncio.gather(*(branch.score(asked + reply) for reply in replies))
    except ScoreUnsupportedError:
        if not asked:
            return await read_verdict(branch)
        (fork,) = await branch.fork(1)
        try:
            return await read_verdict(await fork.append(asked))
        finally:
            fork.release()
    return p_yes(yes, no)
