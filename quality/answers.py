"""Answer-level quality: do two precisions of a model give the same answers to the same
questions?

Each model answers every prompt greedily (temperature 0), as a chat message formatted with the
model's own chat template (llama-cpp-python's chat handler, the one the agent's worker serves
through), from an empty context, up to `max_tokens` tokens. The candidate's answers are then
compared with the reference's:

- exact match: the share of prompts whose two answers are the same text (surrounding
  whitespace ignored);
- chrF (sacrebleu's corpus chrF, character n-grams up to 6, beta 2) of the candidate's answers
  against the reference's, 0..100. The reference against itself scores 100, so the "quality
  drop" the studies speak of is `100 - chrF`.

These are agreement with the reference precision, not accuracy against a ground truth: a
candidate that repeats the reference's mistakes scores 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["AnswerAgreement", "agreement", "greedy_answers"]


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


def greedy_answers(
    model: Path,
    prompts: Sequence[str],
    max_tokens: int = 48,
    n_ctx: int = 512,
    threads: int | None = None,
) -> list[str]:
    """`model`'s greedy answer to each prompt (a user message), see the module docstring."""
    import llama_cpp  # heavy native import, only for callers that score models

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )
    answers = []
    for prompt in prompts:
        llm.reset()  # from an empty context: the answer cannot depend on the prompt before
        result: Any = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            temperature=0.0,
            max_tokens=max_tokens,
        )
        answers.append(result["choices"][0]["message"]["content"] or "")
    del llm
    return answers
