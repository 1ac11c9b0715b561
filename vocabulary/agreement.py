"""Do two sets of answers agree? Exact match and chrF of a candidate's answers against a
reference's: one implementation for `wattops quality` (two precisions answering the evaluation
prompts) and for the agent's canary (two precisions answering the same live requests).

- exact match: the share of answers that are the same text (surrounding whitespace ignored);
- chrF (sacrebleu's corpus chrF, character n-grams up to 6, beta 2) of the candidate's answers
  against the reference's, 0..100; the reference against itself scores 100, so the "quality
  drop" the studies speak of is `100 - chrF`.

Agreement with the reference, not accuracy against a ground truth: a candidate that repeats
the reference's mistakes scores 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["AnswerAgreement", "agreement"]


@dataclass(frozen=True)
class AnswerAgreement:
    """How a candidate's answers compare with the reference's over `prompts` prompts."""

    prompts: int
    exact_match: float
    chrf: float

    @property
    def chrf_drop(self) -> float:
        """Points of chrF lost against the reference (which scores 100 against itself)."""
        return 100.0 - self.chrf

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chrf_drop": self.chrf_drop}


def agreement(reference: Sequence[str], candidate: Sequence[str]) -> AnswerAgreement:
    """Exact-match rate and chrF of `candidate` answers against `reference` answers."""
    from sacrebleu.metrics import CHRF

    if len(reference) != len(candidate) or not reference:
        raise ValueError(
            f"need one candidate answer per reference answer, at least one; got "
            f"{len(candidate)} for {len(reference)}"
        )
    same = sum(r.strip() == c.strip() for r, c in zip(reference, candidate, strict=True))
    if same == len(reference):
        chrf = 100.0  # sacrebleu scores two empty corpora 0; identical answers agree fully
    else:
        chrf = CHRF().corpus_score(list(candidate), [list(reference)]).score
    return AnswerAgreement(prompts=len(reference), exact_match=same / len(reference), chrf=chrf)
