"""``auto``: spend compute only where the answer is unsettled -- an adaptive policy over arms, tuned per machine.

An arm is a model, a representation and a temperature: the model's step-by-step **reasoning**, or a **program** it
writes and the sandbox runs (as in ``pal``), greedy or sampled. The policy (``ponder.strategies.auto_profile``) opens
with the cheapest informative pair -- with the shipped profile, the 1.5B's greedy program and its greedy reasoning,
decoded together in one batch -- and answers at once when they agree (a program that fails or prints nothing is no
vote). Otherwise it adds waves of branches of the arms that paid most per second on this machine, in the profile's
order, until the vote is settled: the leader leads the runner-up by ``margin`` votes, each branch voting with its arm's
weight. It stops there, at ``max_branches``, at the token budget, or at ``budget_s`` seconds (a wave predicted not to
finish in time does not start; one still running at the deadline is cancelled). Within a wave, each finished branch is
counted at once, and once the vote is settled the branches still running are cancelled. A run that ends unsettled (the
cap or a budget, no answer ahead by the margin) answers with its vote, except where the vote is a tie: there the
model's correctness probe picks among the tied reasoning branches (``tiebreak``).

A run's ``prompt`` is the reasoning arms'; the program arms write with ``pal``'s prompt under the same system message.
Where the arms' model is not available -- the 1.5B not installed, or a remote engine serving one model -- the arms
run on the engine's own model, and ``details["note"]`` says so. ``n`` is not used: the profile's ``max_branches``
(or the option) bounds the branches.

``details``: ``stopped`` (``agreed``, ``margin``, ``max branches``, ``token budget`` or ``time budget``), ``waves``,
``arms`` (each arm's branches and the answers they voted), ``effort``, ``profile`` (its file and name) and ``models``
(the model each arm's model ran on). Every branch's details give its ``arm`` and ``kind`` (a program branch also what
its program did, as in ``pal``).

Options:
  effort        ``low``, ``medium`` (default) or ``high``: which of the profile's policies (over HTTP,
                ``reasoning_effort`` sets it)
  budget_s      stop adding branches, and cancel those running, at this many seconds (default: none)
  profile       the profile to read (a path; default: $PONDER_PROFILE, else the one ``ponder tune`` wrote on this
                machine, else the shipped one)
  margin, max_branches   override the policy's
  tiebreak      what breaks a split vote when a run did not settle (the cap or a budget ended it with no answer
                ahead by the margin) and every answer has one branch, or answers tie for the lead: ``probe`` (the
                reasoning branch, of the tied answers, that the model's correctness probe rates most likely right,
                ``ponder.probes``: the reasoning arms then keep their final hidden state, at no cost; needs the
                in-process engine and a probe for the model), ``logprob`` (the same by mean token log-probability)
                or ``vote`` (the first answer seen). Otherwise the arm-weighted vote answers. Default: ``probe``
                where the model has a probe (both bundled models do) and the engine reads hidden states, else
                ``vote``. ``details["tiebreak"]`` says which answered an unsettled run, with the scores read.
  timeout       seconds a program may run, wall clock and CPU (default 5)
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace

from ..answers import Vote, vote
from ..engine.base import Branch, Engine, PonderError, SamplingParams, Usage
from ..probes import ProbeError, branch_model, kept_score, probe_for
from ..prompts import DEFAULT_PROMPT, MathPrompt
from ..result import BranchSummary, Result
from ..stopping import TokenBudget
from .auto_profile import Arm, Policy, Profile, load_profile, with_overrides
from .pal import REPLY_START, Programs, program_params, program_prompt
from .pool import Pool
from .registry import Strategy

TIEBREAKS = ("vote", "probe", "logprob")
SETTLED = ("agreed", "margin")  # the stop reasons at which the vote is not split


@dataclass(eq=False)
class _Call:
    """One branch asked of an arm: the pool it was forked in, and the branch once it can vote."""

    arm: Arm
    pool: Pool | None = None
    branch: Branch | None = None


class _Arms:
    """The pools of one run: one per (model, kind), opened the first time an arm needs it, all on one usage and one
    token budget. An arm's model that the engine cannot open runs on the engine's own model instead."""

    def __init__(self, engine: Engine, question: str, stack: AsyncExitStack, *, seed: int | None, budget: TokenBudget,
                 prompt: MathPrompt, programs: Programs, tiebreak: str | None):
        self.engine, self.question, self.stack = engine, question, stack
        self.seed, self.budget, self.prompt, self.programs = seed, budget, prompt, programs
        self.tiebreak = tiebreak  # None until the first reasoning pool opens: the probe if its model has one
        self.pools: dict[tuple[str | None, str], Pool] = {}
        self.opening: dict[tuple[str | None, str], asyncio.Task] = {}
        self.ran_on: dict[str, str] = {}  # an arm's model -> the model it ran on
        self.opening_voters = 0  # how many of the voters are the opening wave's
        self.notes: list[str] = []

    async def pool(self, arm: Arm) -> Pool:
        model = None if arm.model in ("", self.engine.model.name) else arm.model
        if model is not None and self.ran_on.get(model) == self.engine.model.name:
            model = None  # that model failed to open before: run on the engine's own
        key = (model, arm.kind)
        if key not in self.opening:  # one opening per pool, however many arms wait for it
            self.opening[key] = asyncio.ensure_future(self._open(model, arm.kind))
        return await asyncio.shield(self.opening[key])

    async def _open(self, model: str | None, kind: str) -> Pool:
        prompt = program_prompt(self.prompt) if kind == "program" else self.prompt
        pool = Pool(self.engine, self.question, seed=self.seed, budget=self.budget, prompt=prompt, model=model)
        try:
            await self.stack.enter_async_context(pool)
        except PonderError as e:
            if model is None:
                raise
            # the model is not installed, or a remote engine serves only its own: the arms run on that one
            if self.ran_on.get(model) != self.engine.model.name:  # say it once, whichever kind failed first
                self.ran_on[model] = self.engine.model.name
                self.notes.append(f"{model} is not available here ({e}); its arms ran on {self.engine.model.name}")
            return await self.pool(Arm("", "", kind, 0.0))
        if model is not None:
            self.ran_on.setdefault(model, model)
        if kind == "program":
            await pool.root.append(REPLY_START)
        elif self.tiebreak in ("probe", None):
            try:
                probe_for(branch_model(pool.root))
                self.tiebreak = "probe"
            except ProbeError:
                if self.tiebreak == "probe":  # asked for: say so before decoding
                    raise
                self.tiebreak = "vote"  # no probe for this model, or a remote one (no hidden states)
        self.pools[(model, kind)] = pool
        return pool

    async def sample(self, call: _Call, params: SamplingParams) -> None:
        """One branch of ``call.arm``, once it can vote (its program run); none when the token budget had no room."""
        arm = call.arm
        call.pool = await self.pool(arm)
        arm_params = replace(params, temperature=arm.temperature)
        if arm.kind == "reasoning" and self.tiebreak not in ("vote", None):  # what the tie-break reads, kept
            arm_params = replace(arm_params, hidden=arm_params.hidden or self.tiebreak == "probe",
                                 logprobs=arm_params.logprobs or self.tiebreak == "logprob")
        if arm.kind == "program":
            done = await call.pool.sample(program_params(arm_params), first=1, after_decode=self.programs.run)
        else:
            done = await call.pool.sample(arm_params, first=1)
        call.branch = done[0] if done else None

    def answer(self, branch: Branch, kind: str) -> str | None:
        if kind == "program":
            return self.programs.answer(branch)
        return BranchSummary.of(branch).answer


async def run(engine: Engine, question: str, *, n: int = 8, params: SamplingParams = SamplingParams(),
              seed: int | None = None, budget: int | None = None, prompt: MathPrompt = DEFAULT_PROMPT,
              effort: str = "medium", budget_s: float | None = None, profile: str | None = None,
              margin: float | None = None, max_branches: int | None = None, timeout: float = 5.0,
              tiebreak: str | None = None) -> Result:
    if budget_s is not None and not budget_s > 0:
        raise PonderError(f"budget_s must be more than 0 seconds, got {budget_s}")
    if tiebreak is not None and tiebreak not in TIEBREAKS:
        raise PonderError(f"tiebreak must be one of {', '.join(TIEBREAKS)}, got {tiebreak!r}")
    chosen: Profile = load_profile(profile)
    policy: Policy = with_overrides(chosen.policy(effort), margin=margin, max_branches=max_branches)
    policy.check(f"profile {chosen.source}", list(chosen.arms))
    start = time.perf_counter()
    deadline = None if budget_s is None else start + budget_s
    usage = Usage()
    programs = Programs(usage, timeout)
    tokens = TokenBudget(budget, usage)
    voters: list[tuple[Arm, Branch]] = []  # the branches that voted: the opening's in policy order, then as finished
    every: list[tuple[Arm, Branch]] = []  # every branch started, for the result
    stopped, waves = None, 0
    async with AsyncExitStack() as stack:
        arms = _Arms(engine, question, stack, seed=seed, budget=tokens, prompt=prompt, programs=programs,
                     tiebreak=tiebreak)
        for wave in policy.waves():
            if tokens.room() == 0:
                stopped = "token budget"
                break
            if deadline is not None and waves and time.perf_counter() + _predicted_s(chosen, wave) > deadline:
                stopped = "time budget"
                break
            waves += 1
            calls = [_Call(chosen.arms[name]) for name in wave]
            stopped = await _wave(calls, arms, policy, params, voters, every, opening=waves == 1, deadline=deadline)
            if stopped is not None:
                break
        if stopped is None:
            stopped = "token budget" if tokens.room() == 0 else "max branches"
        await asyncio.gather(*arms.opening.values(), return_exceptions=True)  # a pool still opening joins the stack
        summaries = [_summary(arms, arm, branch) for arm, branch in every]
        answers = [arms.answer(branch, arm.kind) for arm, branch in voters]
        ballot = vote(answers, [arm.weight for arm, _ in voters])
        usage.wall_s = time.perf_counter() - start
        # What the run's options left open, as the profile filled it in.
        config = {"profile": chosen.source, "margin": policy.margin, "max_branches": policy.max_branches}
        result = Result.from_vote(ballot, summaries, usage, engine.model, "auto", config)
        broken = _tiebreak(arms.tiebreak or "vote", voters, ballot) if stopped not in SETTLED else None
        if broken is not None and broken[0] is not None:
            result.answer = broken[0]
        per_arm: dict[str, dict] = {}
        for (arm, _), answer in zip(voters, answers):
            per_arm.setdefault(arm.name, {"branches": 0, "answers": []})["answers"].append(answer)
        for arm, _ in every:
            per_arm.setdefault(arm.name, {"branches": 0, "answers": []})["branches"] += 1
        result.details = {"stopped": stopped, "waves": waves, "arms": per_arm, "effort": effort,
                          "profile": {"file": chosen.source, "name": chosen.name},
                          "models": {arm.name: arms.ran_on.get(arm.model, arm.model or engine.model.name)
                                     for arm in chosen.arms.values() if arm.name in per_arm}}
        if stopped not in SETTLED:  # who answered the split vote, and what the tie-break read
            result.details["tiebreak"] = {"by": arms.tiebreak if broken and broken[0] is not None else "vote",
                                          **({"scores": broken[1]} if broken is not None else {})}
        if arms.notes:
            result.details["note"] = "; ".join(arms.notes)
        return result


async def _wave(calls: list[_Call], arms: _Arms, policy: Policy, params: SamplingParams,
                voters: list[tuple[Arm, Branch]], every: list[tuple[Arm, Branch]], *, opening: bool,
                deadline: float | None) -> str | None:
    """Run one wave's branches together; each finished branch votes at once (the opening's all together, in the
    policy's order, once they have all finished). Returns why the run stops, or None to go on."""
    tasks = {asyncio.ensure_future(arms.sample(call, params)): call for call in calls}
    pending = set(tasks)
    reason = None
    try:
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return (reason := "time budget")
            for task in sorted(done, key=list(tasks).index):
                task.result()  # an engine error propagates
                call = tasks[task]
                if call.branch is not None and not opening:
                    voters.append((call.arm, call.branch))
            if opening and pending:
                continue
            if opening:
                voters.extend((c.arm, c.branch) for c in calls if c.branch is not None)
                arms.opening_voters = len(voters)
            reason = _stop_reason(policy, arms, voters)
            if reason is not None:
                return reason
        return None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if opening and reason == "time budget":  # the opening's finished branches still vote
            voters.extend((c.arm, c.branch) for c in calls if c.branch is not None)
        every.extend(_attributed(calls, every))


def _stop_reason(policy: Policy, arms: _Arms, voters: list[tuple[Arm, Branch]]) -> str | None:
    """The policy's verdict on the vote so far (asked once the opening has finished)."""
    answers = [arms.answer(branch, arm.kind) for arm, branch in voters]
    ballot = vote(answers, [arm.weight for arm, _ in voters])
    opening = answers[:arms.opening_voters]
    agrees = len(opening) == len(policy.open) and None not in opening and len(vote(opening).groups) == 1
    return policy.stop_reason(list(ballot.groups.values()), opened=True, opening_agrees=agrees)


def _tiebreak(by: str, voters: list[tuple[Arm, Branch]], ballot: Vote) -> tuple[str | None, list[dict]] | None:
    """``break_tie`` of the split vote ``ballot`` by ``by``'s scores of the reasoning ``voters``: (its answer or None,
    every reasoning voter's score); None for ``vote``."""
    if by == "vote":
        return None
    scores = {}
    for i, (arm, branch) in enumerate(voters):
        score = kept_score(branch) if by == "probe" else branch.mean_logprob
        if arm.kind == "reasoning" and score is not None:
            scores[i] = float(score)
    group = {i: rep for rep, members in ballot.members.items() for i in members}
    shown = [{"arm": voters[i][0].name, "answer": group.get(i), "score": round(s, 4)} for i, s in scores.items()]
    return break_tie(ballot, scores), shown


def break_tie(ballot: Vote, scores: dict[int, float]) -> str | None:
    """The answer that the scored voters (by index into the ballot) pick where the vote cannot: when every answer has
    one voter, the best-scored voter's; when answers tie for the lead, the best-scored voter's among those answers
    (of equal scores, the first voter's). None where one answer leads, or no candidate has a score: the vote stands.
    Agreement between branches is the strongest signal measured here, so a score only decides what it cannot."""
    lead = max(ballot.groups.values(), default=0.0)
    tied = {rep for rep, weight in ballot.groups.items() if weight >= lead - 1e-9}
    split = all(len(members) == 1 for members in ballot.members.values())
    if not split and len(tied) < 2:
        return None
    group = {i: rep for rep, members in ballot.members.items() for i in members}
    best = None
    for i in sorted(scores):
        if i in group and (split or group[i] in tied) and (best is None or scores[i] > scores[best]):
            best = i
    return None if best is None else group[best]


def _attributed(calls: list[_Call], already: list[tuple[Arm, Branch]]) -> list[tuple[Arm, Branch]]:
    """The branches a wave started, each with its arm, in the wave's order: a finished branch is its call's; one cut
    short (cancelled, halted) goes to a call of its pool that got none."""
    seen = {id(branch) for _, branch in already} | {id(c.branch) for c in calls if c.branch is not None}
    fresh = {id(c.pool): [b for b in c.pool.branches if id(b) not in seen] for c in calls if c.pool is not None}
    started = []
    for call in calls:
        if call.branch is not None:
            started.append((call.arm, call.branch))
        elif call.pool is not None and fresh[id(call.pool)]:
            started.append((call.arm, fresh[id(call.pool)].pop(0)))
    return started


def _summary(arms: _Arms, arm: Arm, branch: Branch) -> BranchSummary:
    summary = arms.programs.summary(branch) if arm.kind == "program" else BranchSummary.of(branch)
    summary.details = {"arm": arm.name, "kind": arm.kind, **(summary.details or {})}
    return summary


def _predicted_s(profile: Profile, wave: list[str]) -> float:
    """What a wave should take on the machine the profile was tuned on: its longest arm's mean tokens at the step time
    of the wave's width."""
    arms = [profile.arms[name] for name in wave]
    return max(arm.tokens for arm in arms) * max(profile.step_s(arm.model, len(arms)) for arm in arms)


def preferred_model(options: dict) -> str | None:
    """The model ``ponder ask`` and ``ponder.ask`` load when the user names none: the profile's first arm's model,
    if it is installed (else None: the default model, on which the arms then run)."""
    from ..models import CATALOG, status

    try:
        chosen = load_profile(options.get("profile"))
    except PonderError:
        return None  # the run itself reports a bad profile
    model = chosen.arms[chosen.policy(options.get("effort", "medium")).open[0]].model
    if model in CATALOG and not status(CATALOG[model]).installed:
        return None
    return model or None


STRATEGY = Strategy("auto", run, "the default: greedy program + greedy reasoning, more branches only while they "
                    "disagree (a profile tuned per machine by ponder tune); the hidden-state probe breaks a tied vote",
                    "program", preferred_model=preferred_model)
