"""The quality of a model's precisions against its base: measured once per model file, kept.

One table per base model file: for each precision, the teacher-forced figures on the shipped
text (`teacher_forced.py`) and the answer-level figures on the shipped prompts
(`answers.py`), both against the base's own precision (an f16 base: f16). `wattops quality`,
the bench and the router read the same table; it is computed only for what the cache lacks.

The cache lives in `cache_dir()/quality/<model identity>.json` (identity: path, size and
modification time of the base, the key the variant store files its builds under) and records
the method (a hash of the text, the prompts and the settings); a different method, a changed
file or a corrupt cache file means measuring again, never reading stale figures. Variants are
built into `cache_dir()/variants` by the agent's own VariantStore. A file lock keeps two
processes from measuring one model at once: the second waits and reads the first's figures.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from wattops.engines.variants import (
    VariantStore,
    model_identity,
    precision_of,
    quantizable_from,
)
from wattops.quality.answers import agreement, greedy_answers
from wattops.quality.teacher_forced import TeacherForced, teacher_forced
from wattops.vocabulary import atomic_write, cache_dir

__all__ = [
    "DEFAULT_PRECISIONS",
    "PrecisionQuality",
    "QualityFloor",
    "QualityTable",
    "cached",
    "evaluation_prompts",
    "evaluation_text",
    "measure",
]

#: What `wattops quality` measures when not told: the base and the four usual quantizations.
DEFAULT_PRECISIONS = ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")
#: Bumped when the way figures are computed changes (the cache then measures again).
METHOD_VERSION = 1
N_CTX = 512
MAX_TOKENS = 48


@cache
def evaluation_text() -> str:
    """The teacher-forced text: Moby-Dick, chapters 1 and 2 (public domain; data/SOURCES.md)."""
    return resources.files("wattops.quality").joinpath("data/moby-dick-1-2.txt").read_text()


@cache
def evaluation_prompts() -> tuple[str, ...]:
    """The answer-level prompts (data/prompts.txt, written for wattops)."""
    text = resources.files("wattops.quality").joinpath("data/prompts.txt").read_text()
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def method_key(text: str, prompts: Sequence[str], n_ctx: int, max_tokens: int) -> str:
    blob = json.dumps([METHOD_VERSION, text, list(prompts), n_ctx, max_tokens])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QualityFloor:
    """The least quality a cheaper precision must keep against the reference to be chosen."""

    top1_agreement: float = 0.90
    chrf_drop: float = 1.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.top1_agreement <= 1.0:
            raise ValueError(
                f"the top-1 agreement floor must be between 0 and 1, not {self.top1_agreement}"
            )
        if not 0.0 <= self.chrf_drop <= 100.0:
            raise ValueError(f"the chrF drop bound must be 0..100 points, not {self.chrf_drop}")

    def shortfalls(self, row: PrecisionQuality) -> list[str]:
        """Why `row` misses the floor (empty: it meets it)."""
        missing = []
        if row.top1_agreement < self.top1_agreement:
            missing.append(f"top-1 agreement {row.top1_agreement:.1%} < {self.top1_agreement:.0%}")
        if row.chrf_drop > self.chrf_drop:
            missing.append(f"chrF drop {row.chrf_drop:.2f} > {self.chrf_drop:g} points")
        return missing

    def describe(self, reference: str) -> str:
        return (
            f"top-1 agreement >= {self.top1_agreement:.0%} and chrF drop <= "
            f"{self.chrf_drop:g} points against {reference}"
        )


@dataclass(frozen=True)
class PrecisionQuality:
    """One precision of a model against the reference precision."""

    precision: str
    reference: str
    file_bytes: int
    positions: int
    mean_kl: float
    top1_agreement: float
    perplexity_ratio: float
    prompts: int
    exact_match: float
    chrf: float

    @property
    def chrf_drop(self) -> float:
        return 100.0 - self.chrf

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chrf_drop": self.chrf_drop}


@dataclass(frozen=True)
class QualityTable:
    """Every measured precision of `model`, in the order asked for."""

    model: str
    reference: str
    rows: tuple[PrecisionQuality, ...]

    def row(self, precision: str) -> PrecisionQuality:
        for row in self.rows:
            if row.precision == precision:
                return row
        raise KeyError(precision)

    def cheapest(self, floor: QualityFloor) -> tuple[PrecisionQuality, str]:
        """The smallest file among the precisions that meet `floor` (the reference always
        does), and a sentence saying why it was chosen and what the smaller ones missed.

        File size stands for cost: decoding reads every weight once per token, so on the
        memory-bound machines models are served from, fewer bytes mean less time and energy.
        """
        by_size = sorted(self.rows, key=lambda r: r.file_bytes)
        passed = [r for r in by_size if r.precision == self.reference or not floor.shortfalls(r)]
        if not passed:
            raise ValueError(f"the table of {self.model} has no row for {self.reference}")
        chosen = passed[0]
        skipped = [
            f"{r.precision} ({'; '.join(floor.shortfalls(r))})"
            for r in by_size
            if r.file_bytes < chosen.file_bytes and r.precision != self.reference
        ]
        why = (
            f"{chosen.precision}: the smallest precision with {floor.describe(self.reference)} "
            f"(top-1 {chosen.top1_agreement:.1%}, chrF drop {chosen.chrf_drop:.2f})"
        )
        if skipped:
            why += "; smaller ones miss it: " + ", ".join(skipped)
        return chosen, why

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "reference": self.reference,
            "precisions": {r.precision: r.as_dict() for r in self.rows},
        }


# -- measuring, with the cache -------------------------------------------------------------


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_cache(path: Path, method: str, reference: str) -> dict[str, Any]:
    empty: dict[str, Any] = {"method": method, "reference": reference, "answers": {},
                             "teacher_forced": {}, "file_bytes": {}}  # fmt: skip
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return empty  # none yet, or unreadable: measured again, and rewritten whole
    if not isinstance(data, dict) or data.get("method") != method:
        return empty
    if data.get("reference") != reference:
        return empty
    for key in ("answers", "teacher_forced", "file_bytes"):
        if not isinstance(data.get(key), dict):
            return empty
    return data


def measure(
    model: Path,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    *,
    root: Path | None = None,
    threads: int | None = None,
    on_stage: Callable[[str], None] | None = None,
    text: str | None = None,
    prompts: Sequence[str] | None = None,
) -> QualityTable:
    """The quality table of `precisions` of the base `model` (see the module docstring).

    ValueError names a precision that cannot be built from this base (and the ones that can).
    `text` and `prompts` replace the shipped ones (tests use short ones).
    """
    text = evaluation_text() if text is None else text
    prompts = evaluation_prompts() if prompts is None else tuple(prompts)
    reference = precision_of(model)
    allowed = quantizable_from(reference)
    unknown = [p for p in precisions if p not in allowed]
    if unknown or not precisions:
        raise ValueError(
            f"cannot measure {', '.join(unknown) or 'no precision'} of {model.name} (a "
            f"{reference} base); allowed: {', '.join(allowed)}"
        )
    root = cache_dir() if root is None else root
    threads = threads or os.cpu_count() or 1
    stage = on_stage or (lambda _: None)
    method = method_key(text, prompts, N_CTX, MAX_TOKENS)
    path = root / "quality" / f"{model_identity(model)}.json"
    with _locked(path.with_suffix(".lock")):
        data = _read_cache(path, method, reference)
        data.update(model=str(model.resolve()), reference=reference)
        store = VariantStore(root / "variants")
        files = {
            p: model if p == reference else asyncio.run(store.ensure(model, p, threads))
            for p in dict.fromkeys([reference, *precisions])
        }
        answers: dict[str, list[str]] = data["answers"]
        for precision, file in files.items():
            data["file_bytes"][precision] = file.stat().st_size
            if precision not in answers:
                stage(f"answering {len(prompts)} prompts at {precision}")
                answers[precision] = greedy_answers(file, prompts, MAX_TOKENS, N_CTX, threads)
        todo = {p: f for p, f in files.items() if p not in data["teacher_forced"]}
        if todo:
            stage(f"reading the evaluation text teacher-forced at {', '.join(todo)}")
            scored = teacher_forced(model, todo, text, N_CTX, threads)
            data["teacher_forced"].update({p: asdict(r) for p, r in scored.items()})
        atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
    return _table(model.name, reference, data, precisions)


def _table(name: str, reference: str, data: dict[str, Any],
           precisions: Sequence[str]) -> QualityTable:  # fmt: skip
    answers = data["answers"]
    rows = []
    for precision in precisions:
        forced = TeacherForced(**data["teacher_forced"][precision])
        agree = agreement(answers[reference], answers[precision])
        rows.append(PrecisionQuality(
            precision=precision, reference=reference, file_bytes=data["file_bytes"][precision],
            positions=forced.positions, mean_kl=forced.mean_kl,
            top1_agreement=forced.top1_agreement, perplexity_ratio=forced.perplexity_ratio,
            prompts=agree.prompts, exact_match=agree.exact_match, chrf=agree.chrf,
        ))  # fmt: skip
    return QualityTable(model=name, reference=reference, rows=tuple(rows))


def cached(model: Path, root: Path | None = None) -> QualityTable | None:
    """The table of every precision of `model` already measured (by `wattops quality`, the
    bench...), read from the cache without measuring anything; None when there is none (no
    such file, never measured, or measured by another method)."""
    try:
        reference = precision_of(model)
        path = (cache_dir() if root is None else root) / "quality" / f"{model_identity(model)}.json"
    except Exception:  # a missing or unreadable model file: nothing cached for it
        return None
    method = method_key(evaluation_text(), evaluation_prompts(), N_CTX, MAX_TOKENS)
    data = _read_cache(path, method, reference)
    done = [
        p for p in data["teacher_forced"]
        if p in data["answers"] and p in data["file_bytes"] and reference in data["answers"]
    ]  # fmt: skip
    if not done:
        return None
    return _table(model.name, reference, data, done)
