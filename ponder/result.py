"""What every strategy returns: the chosen answer, the vote, every branch, and the full usage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .answers import Vote, extract_answer
from .engine.base import Branch, ModelInfo, Usage


@dataclass
class BranchSummary:
    text: str
    answer: str | None
    generated_tokens: int
    finish_reason: str | None
    mean_logprob: float | None = None
    mean_confidence: float | None = None
    details: dict | None = None  # what a strategy reports about this branch (the program it wrote and ran, ...)

    @classmethod
    def of(cls, branch: Branch) -> BranchSummary:
        return cls(
            text=branch.text,
            answer=extract_answer(branch.text, last_number=branch.finish_reason == "stop"),
            generated_tokens=len(branch.tokens) - branch.appended_tokens,
            finish_reason=branch.finish_reason,
            mean_logprob=branch.mean_logprob,
            mean_confidence=branch.mean_confidence,
        )

    def to_dict(self) -> dict:
        """The fields as JSON-ready values; ``details`` only when a strategy set it."""
        fields = asdict(self)
        if self.details is None:
            del fields["details"]
        return fields


@dataclass
class Result:
    answer: str | None
    votes: dict[str, float]
    branches: list[BranchSummary]
    usage: Usage
    model: ModelInfo
    strategy: str
    config: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # what a strategy reports beyond the vote (escalated, steps, ...)

    @classmethod
    def from_vote(cls, vote: Vote, branches: list[BranchSummary], usage: Usage, model: ModelInfo,
                  strategy: str, config: dict) -> Result:
        return cls(vote.winner, dict(vote.groups), branches, usage, model, strategy, config)

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "votes": {a: (int(w) if float(w).is_integer() else round(w, 6)) for a, w in self.votes.items()},
            "branches": [b.to_dict() for b in self.branches],
            "usage": self.usage.to_dict(),
            "model": {"name": self.model.name, "sha256": self.model.sha256},
            "strategy": self.strategy,
            "config": self.config,
            **({"details": self.details} if self.details else {}),
        }
