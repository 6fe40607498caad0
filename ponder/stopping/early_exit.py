"""Early exit (``EarlyExit``, the ``early_exit`` option of the sampling strategies): it ends one branch as soon as its
answer is already there, by answer probes (``answer_probes``) and/or the loop cut (``per_token.LoopCut``), and
appends ``exit_text`` so that the branch's text states the probed answer."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import replace

from ..answers import THINK_CLOSE, THINK_OPEN
from ..engine.base import Branch, PonderError, PromptTooLongError, SamplingParams, StopIf, Usage
from .answer_probes import PROBE, AgreeingProbes, ConvergingProbes, Probe, ProbeRule
from .per_token import LoopCut, first_of

# What an early exit appends to the branch, so that its text states the probed answer (Dynasor's closing words).
EXIT_WORDS = "\n\n... Oh, I have got the answer to the whole problem."
FINAL_ANSWER = "**Final Answer:**\n\\[ \\boxed{{{answer}}} \\]"


def _generated(branch: Branch) -> int:
    return len(branch.tokens) - branch.appended_tokens


def _thinking(branch: Branch) -> bool:
    """Is the branch inside a ``<think>`` block that has not closed? The prompt counts where an engine keeps its text
    (``prompt`` on the remote and fake engines, where a template such as DeepSeek-R1's opens the thinking in the
    prompt); the in-process engine keeps token ids only, so there only a ``<think>`` the model wrote is seen."""
    context = getattr(branch, "prompt", "") + branch.text
    return context.rfind(THINK_OPEN) > context.rfind(THINK_CLOSE)


def exit_text(branch: Branch, answer: str) -> str:
    """What an early exit appends: Dynasor's closing words, the end of the thinking if the branch is thinking, and
    the answer in a box, where ``extract_answer`` finds it."""
    close = f"\n{THINK_CLOSE}\n\n" if _thinking(branch) else " "
    return EXIT_WORDS + close + FINAL_ANSWER.format(answer=answer)


class EarlyExit:
    """The ``early_exit`` option: answer probes (``probe`` or ``converge``) and/or the loop cut (``loop``), applied to
    every branch a strategy samples. ``extend(branch, params, stop_if)`` takes the place of ``branch.extend``.

    Syntax: rules joined by ``+``, each optionally followed by ``:`` and ``key=value`` pairs joined by ``,`` --
    ``probe``, ``loop``, ``probe+loop``, ``converge+loop``, ``probe:every=64,window=2+loop:span=256``. Parameters:
    ``probe``: every (32), tokens (20), window (3); ``converge``: every (32), tokens (20), min_run (3), alpha (0.05);
    ``loop``: span (192), repeats (3), longest (256). At most one probe rule.

    With a probe rule a branch decodes in chunks of ``every`` tokens (``stop_if`` still applies within a chunk; the
    first chunk uses ``params.seed``, later ones continue the branch's own random stream -- so on the in-process engine
    an exited branch's text is a prefix of what it would have written without probes, up to the numerics of another
    batch shape; on a remote server later chunks are unseeded requests). At each chunk boundary a fork of the branch
    gets ``PROBE`` appended and a greedy reply of at most ``tokens`` tokens, while the branch goes on with its next
    chunk: probe and branch decode together, with every other branch of every request, and a probe never holds up
    another branch. A chunk that ends before its probe waits for it. When the probes settle the answer, the branch halts
    at its next token, ``exit_text`` is appended (closing the thinking of a reasoning model), and the branch ends with
    ``finish_reason == "stop"``: it votes, with the probed answer; ``details`` marks it. A branch that ends on its own
    first keeps its own end, and its probe in flight is released.

    Accounting: a probe's appended text and reply count as ``probe_tokens`` of the request, not as prompt or generated
    tokens (the probe's fork gets an account of its own, added to the request's when the probe ends); its fork adds
    the branch's context to ``prompt_tokens_shared`` like any fork; the closing text appended to an exited branch
    counts as prompt tokens, like any appended text. A token budget caps generated tokens only. Stop strings cannot be
    watched across chunk boundaries, so a probe rule refuses them. On the in-process engine each chunk is admitted
    with the KV cells it may write, so under KV pressure a branch can wait between chunks where a single extend
    would have reserved its cells up front; keep n_ctx above branches x max_tokens of the requests in flight.
    """

    RULES = {rule.name: rule for rule in (AgreeingProbes, ConvergingProbes, LoopCut)}

    def __init__(self, probes: ProbeRule | None = None, loop: LoopCut | None = None):
        if probes is None and loop is None:
            raise PonderError("early_exit needs a rule: " + ", ".join(self.RULES))
        self.probes = probes
        self.loop = loop
        self._probed: dict[Branch, list[Probe]] = {}
        self._exited: set[Branch] = set()

    @classmethod
    def parse(cls, spec: str) -> EarlyExit:
        """The early exit ``spec`` asks for (see the class docstring); a ``PonderError`` names what is wrong."""
        rules = {}
        for part in spec.split("+"):
            name, _, arguments = part.strip().partition(":")
            if name not in cls.RULES:
                raise PonderError(f"unknown early_exit rule {name!r}; choose from: {', '.join(cls.RULES)} "
                                  "(joined by +, e.g. probe+loop)")
            rule = cls.RULES[name]
            rules[name] = rule(**_rule_arguments(rule, arguments))
        if "probe" in rules and "converge" in rules:
            raise PonderError("early_exit takes one probe rule: probe or converge, not both")
        return cls(rules.get("probe") or rules.get("converge"), rules.get("loop"))

    def details(self, branch: Branch) -> dict | None:
        """What early exit did to ``branch``: its probes, and ``exit`` (the rule that ended it) if one did."""
        found: dict = {}
        if branch in self._probed:
            found["probes"] = [probe.to_dict() for probe in self._probed[branch]]
        if branch in self._exited:
            found["exit"] = self.probes.name
        elif self.loop is not None and branch in self.loop.cut:
            found.update(exit=self.loop.name, block_chars=self.loop.cut[branch])
        return found or None

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        """Extend ``branch`` as ``branch.extend(params, stop_if)`` does, with the early-exit rules."""
        halt = first_of(self.loop, stop_if)
        if self.probes is None:
            return await branch.extend(params, halt)
        if params.stop:
            raise PonderError("answer probes decode in chunks and cannot watch stop strings; use early_exit=loop "
                              "with stop strings")
        return await self._extend_probed(branch, params, halt)

    async def _extend_probed(self, branch: Branch, params: SamplingParams, halt: StopIf | None) -> Branch:
        probes = self._probed.setdefault(branch, [])
        settled: list[str] = []  # the answer, once the probes have settled it
        chunk_halt = first_of(halt, lambda _: bool(settled))  # settling halts the branch at its next token
        start = _generated(branch)
        seed = params.seed
        in_flight: tuple[Branch, asyncio.Task] | None = None  # the probe of the last boundary: its fork and task
        try:
            while True:
                left = params.max_tokens - (_generated(branch) - start)
                await branch.extend(replace(params, max_tokens=min(self.probes.every, left), seed=seed), chunk_halt)
                seed = None
                full_chunk = branch.finish_reason == "length" or (branch.finish_reason == "halted" and settled)
                if in_flight is not None:
                    fork, probing = in_flight
                    in_flight = None
                    if not full_chunk:
                        fork.release()  # the branch ended (or was halted or cancelled): its probe is of no use
                    await probing
                if branch.released:
                    branch.finish_reason = "cancelled"
                    return branch
                if settled and full_chunk:
                    await branch.append(exit_text(branch, settled[0]))
                    branch.finish_reason = "stop"
                    self._exited.add(branch)
                    return branch
                if branch.finish_reason != "length" or _generated(branch) - start >= params.max_tokens:
                    return branch
                try:
                    (fork,) = await branch.fork(1)
                except PonderError:
                    if not branch.released:
                        raise
                    branch.finish_reason = "cancelled"  # released while the fork waited for a sequence
                    return branch
                probe = self._probe(branch, fork, _generated(branch), probes, settled)
                in_flight = fork, asyncio.create_task(probe)
        finally:
            if in_flight is not None:  # an error or a cancellation: the probe's extend ends at the next step
                in_flight[0].release()

    async def _probe(self, branch: Branch, fork: Branch, at: int, probes: list[Probe], settled: list[str]) -> None:
        """Probe ``fork`` (a fork of ``branch`` after ``at`` generated tokens), record the probe, and settle the
        branch's answer in ``settled`` once the rule says so. The fork is released at the end."""
        own = Usage()
        fork.usage = own  # counted apart, and added to the request's probe_tokens below
        try:
            await fork.append(PROBE)
            reply_start = len(fork.text)
            await fork.extend(SamplingParams(temperature=0.0, max_tokens=self.probes.tokens))
        except PromptTooLongError:
            return  # no room for a probe at the end of the context: the branch goes on unprobed
        except PonderError:
            if not fork.released:
                raise
            return  # the branch ended first and released its probe
        finally:
            fork.release()
            spent = own.prompt_tokens + own.generated_tokens
            if spent:
                branch.usage.add("probe_tokens", spent, fork.model)
        if fork.finish_reason == "cancelled":
            return
        probes.append(Probe.of(at, fork.text[reply_start:]))
        answer = self.probes.settled(probes)
        if answer is not None and not settled:
            settled.append(answer)


def _rule_arguments(rule: type, text: str) -> dict:
    """``"every=64,window=2"`` -> ``{"every": 64, "window": 2}``, checked against the parameters of ``rule``."""
    accepted = {name: p.annotation for name, p in inspect.signature(rule).parameters.items()}
    arguments = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or key not in accepted:
            raise PonderError(f"early_exit {rule.name}: expected KEY=VALUE with KEY one of {', '.join(accepted)}, "
                              f"got {pair!r}")
        kind = int if accepted[key] == "int" else float
        try:
            arguments[key] = kind(value)
        except ValueError:
            raise PonderError(f"early_exit {rule.name}: {key} must be {'a whole number' if kind is int else 'a number'}"
                              f", got {value!r}") from None
    return arguments
