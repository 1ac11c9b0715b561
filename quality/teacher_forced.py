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

__all__ = ["TeacherForced", "compare", "compare_logits", "teacher_forced"]


@dataclass(frozen=True)
class TeacherForced:
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


def _log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Row-wise log-softmax in float32, with one temporary (a 511 x 49,152 window of logits
    is 100 MB in float32: the copies, not the arithmetic, are what cost here)."""
    out = logits - logits.max(axis=-1, keepdims=True)
    lse = np.log(_exp(out).sum(axis=-1, keepdims=True, dtype=np.float64))
    out -= lse.astype(np.float32)
    return out


#: exp() below this underflows to float32 denormals, which run tens of times slower than
#: normal numbers; the probabilities lost (< 1.2e-38 each) change no sum at any digit shown.
_EXP_FLOOR = np.float32(-87.0)


def _exp(x: npt.NDArray[np.float32], out: npt.NDArray[np.float32] | None = None
         ) -> npt.NDArray[np.float32]:  # fmt: skip
    return np.exp(np.maximum(x, _EXP_FLOOR, out=out), out=out)


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
    """Sums over positions for logits of shape (positions, vocab) and the true next tokens.

    Computed in float32 with float64 sums: the log-probabilities differ from a float64
    computation by about 1e-7 relative, far below the 4 digits any figure is reported with."""
    ref = np.asarray(reference, dtype=np.float32)
    cand = np.asarray(candidate, dtype=np.float32)
    nxt = np.asarray(next_tokens, dtype=np.int64)
    if ref.shape != cand.shape or ref.ndim != 2 or nxt.shape != (ref.shape[0],):
        raise ValueError(
            f"logits must both be (positions, vocab) with one next token per position; got "
            f"{ref.shape}, {cand.shape} and {nxt.shape}"
        )
    agree = int((ref.argmax(axis=-1) == cand.argmax(axis=-1)).sum())
    kl = nll_ref = nll_cand = 0.0
    # In blocks of rows: a few MB of temporaries, reused, where whole-window ones (100 MB
    # each) cost more in page faults than in arithmetic.
    for start in range(0, len(nxt), _ROWS):
        rows = slice(start, start + _ROWS)
        lp_ref, lp_cand = _log_softmax(ref[rows]), _log_softmax(cand[rows])
        at = (np.arange(len(lp_ref)), nxt[rows])
        nll_ref -= float(lp_ref[at].sum(dtype=np.float64))
        nll_cand -= float(lp_cand[at].sum(dtype=np.float64))
        lp_cand -= lp_ref  # log q - log p, in place
        lp_cand *= _exp(lp_ref, out=lp_ref)  # p * (log q - log p)
        kl -= float(lp_cand.sum(dtype=np.float64))
    return _Sums(
        positions=len(nxt), kl=max(0.0, kl), agree=agree, nll_reference=nll_ref,
        nll_candidate=nll_cand,
    )  # fmt: skip


#: Rows of logits compared at a time.
_ROWS = 16


def _window_logits(llm: Any, tokens: list[int]) -> npt.NDArray[np.float32]:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def load_for_logits(path: Path, n_ctx: int, threads: int | None) -> Any:
    """A llama-cpp-python model that keeps the logits of every position it reads."""
    import llama_cpp  # heavy native import, only for callers that score models

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def teacher_forced(
    reference: Path,
    candidates: dict[str, Path],
    text: str,
    n_ctx: int = 512,
    threads: int | None = None,
) -> dict[str, TeacherForced]:
    """Score every candidate against `reference` on `text` (see the module docstring).

    The reference reads each window once; every candidate reads the same window right after,
    so only one window's logits per model are held at a time.
    """
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, not {n_ctx}")
    ref_llm = load_for_logits(reference, n_ctx, threads)
    tokens = ref_llm.tokenize(text.encode(), add_bos=True)
    if len(tokens) < 2:
        raise ValueError("the evaluation text must be at least two tokens long")
    # Windows overlap by one token: the last token of one is the first of the next, so every
    # token after the first is predicted exactly once.
    windows = [tokens[i : i + n_ctx] for i in range(0, len(tokens) - 1, n_ctx - 1)]
    windows = [w for w in windows if len(w) >= 2]
    cand_llms = {name: load_for_logits(path, n_ctx, threads) for name, path in candidates.items()}
    totals = {name: [0, 0.0, 0, 0.0, 0.0] for name in candidates}
    for window in windows:
        ref = _window_logits(ref_llm, window)
        for name, llm in cand_llms.items():
            cand = _window_logits(llm, window)
            # Logits at position i predict token i + 1: the last position has nothing to score.
            sums = compare_logits(ref[:-1], cand[:-1], window[1:])
            for k, value in enumerate(
                (sums.positions, sums.kl, sums.agree, sums.nll_reference, sums.nll_candidate)
            ):
                totals[name][k] += value
    del ref_llm, cand_llms
    reports = {}
    for name, (positions, kl, agree, nll_ref, nll_cand) in totals.items():
        n = int(positions)
        reports[name] = TeacherForced(
            reference=reference.name,
            candidate=candidates[name].name,
            positions=n,
            mean_kl=kl / n,
            top1_agreement=agree / n,
            reference_perplexity=math.exp(nll_ref / n),
            candidate_perplexity=math.exp(nll_cand / n),
        )
    return reports


def compare(
    reference: Path,
    candidate: Path,
    text: str,
    n_ctx: int = 512,
    threads: int | None = None,
) -> TeacherForced:
    """One candidate against `reference` on `text`."""
    return teacher_forced(reference, {"candidate": candidate}, text, n_ctx, threads)["candidate"]
