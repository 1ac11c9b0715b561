"""How much a quantized variant changes a model's predictions, measured the way llama.cpp's
`llama-perplexity --kl-divergence` does: teacher-forced over a fixed text, from the logits.

Both models read the same tokens (the reference's tokenization of the text); at every position
each gives a next-token distribution. Reported over the positions:

- mean KL divergence KL(reference || candidate), in nats;
- top-1 agreement: the share of positions where both put their highest logit on one token;
- perplexity of each on the text's actual next tokens, and their ratio (candidate/reference).

The text is read in windows of `n_ctx` tokens, each from a fresh context, so a text longer
than the context is scored in full. Runs in-process with llama-cpp-python.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["EVALUATION_TEXT", "QualityReport", "compare", "compare_logits"]

#: The fixed evaluation text: plain English prose about running models, written for this
#: project (no licence questions), about 600 words.
EVALUATION_TEXT = """\
The night shift starts with a look at the fleet. Every node reports how much power it draws,
how many requests it answered in the last minute, and what each answer cost. Most of the time
the numbers are quiet: a few hundred watts on the large cards, a few tens on the small boards,
and a cost per thousand tokens that moves only when the traffic does.

When the traffic does move, the first question is whether the models can keep up. A queue
that grows for more than a few seconds means the replicas are busy all the time, and every
new request waits behind the ones before it. There are two ways out. The first is to add
replicas, which costs money for as long as they run. The second is to make each answer
cheaper, by serving a smaller copy of the same model. A model stored in sixteen bit numbers
can be rounded to eight or four bits per weight; it then needs less memory, reads less from
memory for every token, and answers faster. The rounding changes the answers a little. How
little is something to measure, not to assume.

The measurement is simple. Take a fixed piece of text, let both copies of the model read it
one word at a time, and at every step compare what each expected to come next. If the two
agree on the most likely next word almost every time, and the spread of their guesses is
close, the smaller copy is good enough for most work. If they disagree often, the saving is
not worth it, and the team keeps the larger copy for the tasks that need it.

The second lever is memory of past answers. Many requests repeat: the same question about a
password reset, the same summary of the same report. An answer that was computed once can be
returned again at almost no cost, as long as the request is exactly the same and the answer
does not depend on chance. The third lever is time. A model that nobody has asked anything
for ten minutes does not need to hold a card; it can be put to sleep and woken by the next
request, which then waits a few seconds longer than usual. Whether that wait is acceptable
depends on who is asking, and the operator who sets the rule should know the answer.

None of these levers is free, and none of them is magic. Each one trades something the team
has, like a little accuracy or a little waiting, for something it wants, like a smaller bill
or a cooler machine room. The job of the tools is to show the trade plainly: what was spent,
what was saved, and how sure anyone can be about either number. A reading from a power meter
is a measurement; a figure worked out from how busy the processor was is an estimate; and a
report that mixes the two without saying so is worse than no report at all.

At the end of the shift the engineer writes down what changed and why. Which models moved to
four bits, which replicas were added and removed, how many answers came from memory, and how
the cost per thousand tokens compared with the night before. The next person on call reads the
note, checks the numbers against the dashboard, and starts the same routine again.
"""


@dataclass(frozen=True)
class QualityReport:
    """A candidate against its reference over `positions` predicted tokens."""

    reference: str
    candidate: str
    positions: int
    mean_kl: float
    top1_agreement: float
    reference_perplexity: float
    candidate_perplexity: float

    @property
    def perplexity_ratio(self) -> float:
        return self.candidate_perplexity / self.reference_perplexity

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}


def _log_softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class _Sums:
    positions: int
    kl: float
    agree: int
    nll_reference: float
    nll_candidate: float


def compare_logits(
    reference: npt.ArrayLike, candidate: npt.ArrayLike, next_tokens: npt.ArrayLike
) -> _Sums:
    """Sums over positions for logits of shape (positions, vocab) and the true next tokens."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    nxt = np.asarray(next_tokens, dtype=np.int64)
    if ref.shape != cand.shape or ref.ndim != 2 or nxt.shape != (ref.shape[0],):
        raise ValueError(
            f"logits must both be (positions, vocab) with one next token per position; got "
            f"{ref.shape}, {cand.shape} and {nxt.shape}"
        )
    lp_ref, lp_cand = _log_softmax(ref), _log_softmax(cand)
    kl = float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum(axis=-1).sum())
    rows = np.arange(len(nxt))
    return _Sums(
        positions=len(nxt),
        kl=max(0.0, kl),
        agree=int((ref.argmax(axis=-1) == cand.argmax(axis=-1)).sum()),
        nll_reference=float(-lp_ref[rows, nxt].sum()),
        nll_candidate=float(-lp_cand[rows, nxt].sum()),
    )


def _window_logits(llm: Any, tokens: list[int]) -> npt.NDArray[np.float32]:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def compare(
    reference: Path,
    candidate: Path,
    text: str = EVALUATION_TEXT,
    n_ctx: int = 512,
    threads: int | None = None,
) -> QualityReport:
    """Score `candidate` against `reference` on `text` (see the module docstring)."""
    import llama_cpp  # heavy native import, only for callers that score models

    def load(path: Path) -> Any:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    ref_llm = load(reference)
    tokens = ref_llm.tokenize(text.encode(), add_bos=True)
    if len(tokens) < 2:
        raise ValueError("the evaluation text must be at least two tokens long")
    windows = [tokens[i : i + n_ctx] for i in range(0, len(tokens) - 1, n_ctx - 1)]
    windows = [w for w in windows if len(w) >= 2]
    ref_logits = [_window_logits(ref_llm, w) for w in windows]
    del ref_llm
    cand_llm = load(candidate)
    totals = [0, 0.0, 0, 0.0, 0.0]
    for window, ref in zip(windows, ref_logits, strict=True):
        cand = _window_logits(cand_llm, window)
        # Logits at position i predict token i + 1: the last position has nothing to score.
        sums = compare_logits(ref[:-1], cand[:-1], window[1:])
        for k, value in enumerate(
            (sums.positions, sums.kl, sums.agree, sums.nll_reference, sums.nll_candidate)
        ):
            totals[k] += value
    del cand_llm
    positions = int(totals[0])
    return QualityReport(
        reference=reference.name,
        candidate=candidate.name,
        positions=positions,
        mean_kl=totals[1] / positions,
        top1_agreement=totals[2] / positions,
        reference_perplexity=math.exp(totals[3] / positions),
        candidate_perplexity=math.exp(totals[4] / positions),
    )
