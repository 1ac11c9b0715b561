"""Answer-level quality: do two precisions of a model give the same answers to the same
questions? (The comparison itself, exact match and chrF, is `vocabulary/agreement.py`: the
agent's canary compares live answers with the same code.)

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
from pathlib import Path
from typing import Any

from wattops.vocabulary.agreement import AnswerAgreement, agreement

__all__ = ["AnswerAgreement", "agreement", "greedy_answers"]


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
