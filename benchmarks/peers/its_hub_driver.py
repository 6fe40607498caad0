"""Runs one its_hub algorithm on questions read from stdin; executed by the its_hub venv's python, never by ponder's.

    python its_hub_driver.py CONFIG_JSON   # then one {"question": ...} per stdin line -> one JSON answer per line

CONFIG_JSON: ``algorithm`` (sc | bon | pf), ``base_url``, ``model``, ``n`` (its_hub's budget), ``temperature``,
``max_tokens``, ``verify`` (the question that asks for P(Yes)), ``max_steps`` (pf).

Each algorithm is used as its documentation shows:

* ``SelfConsistency`` with the ``\\boxed{}`` regex projection of ``create_regex_projection_function`` (without one it
  votes on whole texts);
* ``BestOfN`` with an outcome reward model and ``ParticleFiltering`` with a process reward model, both written
  against its documented interfaces (``AbstractOutcomeRewardModel``, ``AbstractProcessRewardModel``): the same model
  is asked ``verify`` after the (partial) solution, and the reward is P(Yes) / (P(Yes) + P(No)) from the top-20
  log-probabilities of its one-token reply. The judge's requests go to the same base URL, so the counting proxy
  counts them; its_hub's own usage (reported back) leaves them out.

An answer line: ``{"text": final text, "usage": its_hub's GenerationUsage or null}``, or ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys

import its_hub
from its_hub import AbstractOutcomeRewardModel, AbstractProcessRewardModel, BestOfN, SelfConsistency
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
from its_hub.core.algorithms.self_consistency import create_regex_projection_function
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel
from its_hub.core.lms.step_generation import StepGeneration
from openai import AsyncOpenAI

BOXED = r"\\boxed\{([^}]+)\}"


class YesProbability:
    """P(Yes) of the served model, asked ``verify`` after a conversation."""

    def __init__(self, base_url: str, model: str, verify: str):
        self.client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=1800)
        self.model = model
        self.verify = verify

    async def __call__(self, messages: list[dict]) -> float:
        reply = await self.client.chat.completions.create(
            model=self.model, messages=[*messages, {"role": "user", "content": self.verify}], max_tokens=1,
            temperature=0.0, logprobs=True, top_logprobs=20)
        alternatives = reply.choices[0].logprobs.content[0].top_logprobs
        yes = sum(math.exp(a.logprob) for a in alternatives if a.token.strip().lower() == "yes")
        no = sum(math.exp(a.logprob) for a in alternatives if a.token.strip().lower() == "no")
        # its_hub takes the inverse sigmoid of a process reward: keep it strictly inside (0, 1)
        return min(max(yes / (yes + no), 1e-4), 1 - 1e-4) if yes + no > 0 else 0.5


def as_dicts(conversation) -> list[dict]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content or ""} for m in conversation]


class OutcomeReward(AbstractOutcomeRewardModel):
    def __init__(self, p_yes: YesProbability):
        self.p_yes = p_yes

    def score(self, messages, **kwargs):
        return asyncio.run(self.ascore(messages, **kwargs))

    async def ascore(self, messages, orchestrator=None, **kwargs):
        batch = messages and not isinstance(messages[0], dict) and isinstance(messages[0], list)
        conversations = messages if batch else [messages]
        scores = await asyncio.gather(*(self.p_yes(as_dicts(c)) for c in conversations))
        return list(scores) if batch else scores[0]


class ProcessReward(AbstractProcessRewardModel):
    def __init__(self, p_yes: YesProbability):
        self.p_yes = p_yes

    def score(self, prompt_or_messages, steps):
        return asyncio.run(self.ascore(prompt_or_messages, steps))

    async def ascore(self, prompt_or_messages, steps):
        question = prompt_or_messages if isinstance(prompt_or_messages, str) else as_dicts(prompt_or_messages)
        head = [{"role": "user", "content": question}] if isinstance(question, str) else question
        return list(await asyncio.gather(*(self.p_yes([*head, {"role": "assistant", "content": partial}])
                                           for partial in steps)))


def algorithm(config: dict, p_yes: YesProbability):
    kind = config["algorithm"]
    if kind == "sc":
        return SelfConsistency(consistency_space_projection_func=create_regex_projection_function(BOXED))
    if kind == "bon":
        return BestOfN(orm=OutcomeReward(p_yes))
    if kind == "pf":
        steps = StepGeneration(max_steps=config["max_steps"], step_token="\n\n", stop_token=r"\boxed",
                               temperature=config["temperature"])
        return ParticleFiltering(sg=steps, prm=ProcessReward(p_yes))
    raise SystemExit(f"unknown algorithm {kind!r}")


async def answer(lm, method, question: str, n: int) -> dict:
    result = await method.ainfer(lm, question, budget=n, return_response_only=False)
    usage = getattr(result, "usage", None)
    return {"text": result.the_one.get("content") or "",
            "usage": None if usage is None else {"prompt_tokens": usage.prompt_tokens,
                                                 "completion_tokens": usage.completion_tokens,
                                                 "calls": usage.num_calls}}


def main() -> None:
    config = json.loads(sys.argv[1])
    lm = OpenAICompatibleLanguageModel(endpoint=config["base_url"], api_key="none", model_name=config["model"],
                                       max_completion_tokens=config["max_tokens"],
                                       temperature=config["temperature"])
    method = algorithm(config, YesProbability(config["base_url"], config["model"], config["verify"]))
    print(json.dumps({"ready": its_hub.__version__}), flush=True)
    loop = asyncio.new_event_loop()
    for line in sys.stdin:
        question = json.loads(line)["question"]
        try:
            reply = loop.run_until_complete(answer(lm, method, question, config["n"]))
        except Exception as exc:  # reported per question: one failure does not end the run
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    loop.run_until_complete(lm.close())


if __name__ == "__main__":
    main()
