"""Stopping rules: the reusable pieces that decide when a sampling strategy has seen enough.

There are three places a strategy can stop, so there are three kinds of rule, one module each:

* **per-token rules** (``per_token``; ``StopIf``: ``rule(branch) -> bool``) run after every generated token of a
  branch; True halts that branch at once. ``TokenBudget`` caps the request's generated tokens, ``ConfidenceFloor`` is
  DeepConf's sliding-window confidence check, ``LoopCut`` halts a branch that repeats itself. ``first_of`` combines
  several.
* **join rules** (``join``; ``Rule``: ``rule(finished) -> bool``) look at the branches that have finished so far and
  say whether the outcome is settled, so that no more branches need to run and the running ones can be cancelled:
  ``FirstM`` (short-m@k), ``LeaderStable`` (Adaptive-Consistency's Beta/Dirichlet rule) and ``MajorityShare``
  (DeepConf's consensus).
* **early exit** (``early_exit``; ``EarlyExit``, the ``early_exit`` option of the sampling strategies) ends one branch
  as soon as its answer is already there. An answer probe (``answer_probes``) asks the model for its answer so far,
  which takes engine calls (fork, append, extend) that a synchronous per-token rule cannot make; so
  ``EarlyExit.extend`` replaces a branch's ``extend``: it decodes the branch in chunks of ``every`` tokens and probes a
  fork of the branch at each chunk boundary while the next chunk decodes, in the same batch as every other branch
  (see ``EarlyExit``). The probe rules are ``AgreeingProbes`` (Dynasor-CoT / Certaindex) and ``ConvergingProbes``
  (ES-CoT-style); ``LoopCut`` is a per-token rule that ``EarlyExit`` applies and reports.

This package exports the names strategies and tests use.
"""

from .answer_probes import PROBE, AgreeingProbes, ConvergingProbes, Probe, ProbeRule, probed_answer
from .early_exit import EarlyExit, exit_text
from .join import Answer, FirstM, LeaderStable, MajorityShare, Rule, Weigh, ballot, stated_answer
from .per_token import ConfidenceFloor, LoopCut, TokenBudget, first_of, group_confidences

__all__ = ["PROBE", "AgreeingProbes", "Answer", "ConfidenceFloor", "ConvergingProbes", "EarlyExit", "FirstM",
           "LeaderStable", "LoopCut", "MajorityShare", "Probe", "ProbeRule", "Rule", "TokenBudget", "Weigh", "ballot",
           "exit_text", "first_of", "group_confidences", "probed_answer", "stated_answer"]
