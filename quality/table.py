"""The quality of a model's precisions against its base: measured once per model file, kept.

One table per base model file. For each precision:

- **task accuracy** on the labelled set (`labelled.py`): the share of match items answered
  right, with its Wilson 95% interval, and the **accuracy drop** against the base on the same
  items with its paired 95% interval (`intervals.py`); BLEU and chrF of the free-text items
  against their references;
- the **teacher-forced** figures on the shipped text (`teacher_forced.py`): mean KL, top-1
  agreement and perplexity ratio against the base;
- **consistency**: how often its answer to an item is the base's answer word for word, and
  the chrF of its answers against the base's. Secondary: two answers can both be right and
  share few characters.

The floor (`QualityFloor`) is what the studies state: at most `max_accuracy_drop` points of
task accuracy lost against the base (1.5 by default), and optionally at most `max_kl` nats per
token. By default the whole 95% interval of the drop must be within the margin
(non-inferiority, `verdict="bound"`): what picks a precision for an automatic switch must be
shown, not merely estimated; `verdict="point"` judges the point estimate, as the studies
report it. `wattops quality`, the bench and the router read the same table; it is computed only for
what the cache lacks.

The cache lives in `cache_dir()/quality/<model identity>.json` (identity: path, size and
modification time of the base, the key the variant store files its builds under). Answers are
kept per item, keyed by a hash of the request the item is asked as, so a changed or added item
is asked again and nothing else; the teacher-forced figures are kept per precision under a
hash of the text and settings. A changed method, a changed file or a corrupt cache file means
measuring again, never reading stale figures. Variants are built into `cache_dir()/variants`
by the agent's own VariantStore. A file lock keeps two processes from measuring one model at
once: the second waits and reads the first's figures.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from wattops.engines.variants import (
    VariantStore,
    model_identity,
    precision_of,
    quantizable_from,
)
from wattops.quality.answers import answer_items, request_body
from wattops.quality.intervals import Interval, PairedDrop, paired_drop, wilson
from wattops.quality.labelled import LabelledItem, free_text_scores, labelled_set
from wattops.quality.teacher_forced import TeacherForced, teacher_forced
from wattops.vocabulary import atomic_write, cache_dir
from wattops.vocabulary.agreement import agreement

__all__ = [
    "DEFAULT_PRECISIONS",
    "VERDICTS",
    "PrecisionQuality",
    "QualityFloor",
    "QualityTable",
    "cached",
    "evaluation_text",
    "item_key",
    "measure",
]

#: What `wattops quality` measures when not told: the base and the four usual quantizations.
DEFAULT_PRECISIONS = ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0")
#: Bumped when the way figures are computed changes (the cache then measures again).
METHOD_VERSION = 2
N_CTX = 512
#: How the accuracy floor reads the drop's interval: its point estimate, or its upper bound
#: (non-inferiority: the whole interval within the margin).
VERDICTS = ("point", "bound")
Verdict = Literal["point", "bound"]


@cache
def evaluation_text() -> str:
    """The teacher-forced text: Moby-Dick, chapters 1 and 2 (public domain; data/SOURCES.md)."""
    return resources.files("wattops.quality").joinpath("data/moby-dick-1-2.txt").read_text()


def text_key(text: str, n_ctx: int) -> str:
    blob = json.dumps([METHOD_VERSION, text, n_ctx])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def item_key(item: LabelledItem) -> str:
    """The cache key of an item's answer: the request it is asked as."""
    blob = json.dumps(request_body(item), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QualityFloor:
    """The least quality a cheaper precision must keep against the reference to be chosen:
    task accuracy lost (points), and optionally the teacher-forced KL."""

    max_accuracy_drop: float = 1.5
    max_kl: float | None = None
    verdict: Verdict = "bound"

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_accuracy_drop <= 100.0:
            raise ValueError(
                f"the accuracy drop bound must be 0..100 points, not {self.max_accuracy_drop}"
            )
        if self.max_kl is not None and not self.max_kl >= 0.0:
            raise ValueError(f"the KL bound must be at least 0 nats, not {self.max_kl}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is none of {', '.join(VERDICTS)}")

    def shortfalls(self, row: PrecisionQuality) -> list[str]:
        """Why `row` misses the floor (empty: it meets it)."""
        missing = []
        drop = row.drop_points
        judged = drop.estimate if self.verdict == "point" else drop.high
        if judged > self.max_accuracy_drop + 1e-9:
            which = "" if self.verdict == "point" else "upper bound of the "
            missing.append(f"{which}accuracy drop {drop.describe()} points > "
                           f"{self.max_accuracy_drop:g}")  # fmt: skip
        if self.max_kl is not None and row.mean_kl > self.max_kl:
            missing.append(f"KL {row.mean_kl:.4f} > {self.max_kl:g} nats/token")
        return missing

    def describe(self, reference: str) -> str:
        on = "point estimate" if self.verdict == "point" else "95% upper bound"
        text = f"accuracy drop ({on}) <= {self.max_accuracy_drop:g} points"
        if self.max_kl is not None:
            text += f" and KL <= {self.max_kl:g} nats/token"
        return text + f" against {reference}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PrecisionQuality:
    """One precision of a model against the reference precision."""

    precision: str
    reference: str
    file_bytes: int
    # teacher-forced on the shipped text
    positions: int
    mean_kl: float
    top1_agreement: float
    perplexity_ratio: float
    # the labelled set
    items: int  # match items, scored right or wrong
    right: int
    accuracy: Interval  # a share, Wilson 95%
    paired: PairedDrop  # against the reference, on the same items
    text_items: int
    bleu: float
    chrf: float  # against the references
    # consistency with the reference's answers (every item)
    exact_match: float
    consistency_chrf: float

    @property
    def drop_points(self) -> Interval:
        """Accuracy points lost against the reference, with the paired 95% interval."""
        return self.paired.drop.scaled(100.0)

    @property
    def accuracy_kept(self) -> float:
        """Accuracy as a share of the reference's (1.0: as accurate; what a route's
        `min_quality` compares)."""
        base = self.accuracy.estimate + self.paired.drop.estimate
        return 1.0 if base <= 0 else self.accuracy.estimate / base

    def as_dict(self) -> dict[str, Any]:
        acc, drop = self.accuracy.scaled(100.0), self.drop_points
        out = asdict(self)
        out.update(
            accuracy_pct=acc.estimate, accuracy_low_pct=acc.low, accuracy_high_pct=acc.high,
            drop_points=drop.estimate, drop_low=drop.low, drop_high=drop.high,
            accuracy_kept=self.accuracy_kept,
        )  # fmt: skip
        return out


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
            f"(accuracy {chosen.accuracy.scaled(100).describe('%')}, drop "
            f"{chosen.drop_points.describe()} points over {chosen.items} items, KL "
            f"{chosen.mean_kl:.4f})"
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


def _read_cache(path: Path, reference: str) -> dict[str, Any]:
    empty: dict[str, Any] = {"version": METHOD_VERSION, "reference": reference, "answers": {},
                             "teacher_forced": {}, "file_bytes": {}}  # fmt: skip
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return empty  # none yet, or unreadable: measured again, and rewritten whole
    if not isinstance(data, dict) or data.get("version") != METHOD_VERSION:
        return empty
    if data.get("reference") != reference:
        return empty
    for key in ("answers", "teacher_forced", "file_bytes"):
        if not isinstance(data.get(key), dict):
            return empty
    if not all(isinstance(v, dict) for v in (*data["answers"].values(),
                                            *data["teacher_forced"].values())):  # fmt: skip
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
    items: Sequence[LabelledItem] | None = None,
) -> QualityTable:
    """The quality table of `precisions` of the base `model` (see the module docstring).

    ValueError names a precision that cannot be built from this base (and the ones that can).
    `text` and `items` replace the shipped ones (tests use short ones).
    """
    text = evaluation_text() if text is None else text
    items = labelled_set() if items is None else tuple(items)
    reference = precision_of(model)
    allowed = quantizable_from(reference)
    unknown = [p for p in precisions if p not in allowed]
    if unknown or not precisions:
        raise ValueError(
            f"cannot measure {', '.join(unknown) or 'no precision'} of {model.name} (a "
            f"{reference} base); allowed: {', '.join(allowed)}"
        )
    if not any(item.matched for item in items):
        raise ValueError("the labelled set needs at least one item scored right or wrong")
    root = cache_dir() if root is None else root
    threads = threads or os.cpu_count() or 1
    stage = on_stage or (lambda _: None)
    forced_key = text_key(text, N_CTX)
    path = root / "quality" / f"{model_identity(model)}.json"
    with _locked(path.with_suffix(".lock")):
        data = _read_cache(path, reference)
        data.update(model=str(model.resolve()), reference=reference)
        store = VariantStore(root / "variants")
        files = {}
        for p in dict.fromkeys([reference, *precisions]):
            if p != reference and not store.path_for(model, p).exists():
                stage(f"building the {p} variant")
            files[p] = model if p == reference else asyncio.run(store.ensure(model, p, threads))
        for precision, file in files.items():
            data["file_bytes"][precision] = file.stat().st_size
            kept: dict[str, str] = data["answers"].setdefault(precision, {})
            todo = [item for item in items if item_key(item) not in kept]
            if todo:
                started = time.monotonic()
                stage(f"answering {len(todo)} items at {precision}")
                for item, answer in zip(todo, answer_items(file, todo, threads), strict=True):
                    kept[item_key(item)] = answer
                stage(f"answered at {precision} in {time.monotonic() - started:.0f} s")
                # Kept at once: an interrupted run loses at most the precision it was on.
                atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
        todo_forced = {p: f for p, f in files.items()
                       if forced_key not in data["teacher_forced"].get(p, {})}  # fmt: skip
        if todo_forced:
            started = time.monotonic()
            stage(f"reading the evaluation text teacher-forced at {', '.join(todo_forced)}")
            scored = teacher_forced(model, todo_forced, text, N_CTX, threads)
            for p, r in scored.items():
                data["teacher_forced"].setdefault(p, {})[forced_key] = asdict(r)
            stage(f"teacher-forced in {time.monotonic() - started:.0f} s")
        atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
    return _table(model.name, reference, data, precisions, items, forced_key)


def _table(name: str, reference: str, data: dict[str, Any], precisions: Sequence[str],
           items: Sequence[LabelledItem], forced_key: str) -> QualityTable:  # fmt: skip
    keys = [item_key(item) for item in items]
    base = [data["answers"][reference][k] for k in keys]
    matched = [i for i, item in enumerate(items) if item.matched]
    texts = [i for i, item in enumerate(items) if not item.matched]
    base_right = [items[i].right(base[i]) for i in matched]
    rows = []
    for precision in precisions:
        forced = TeacherForced(**data["teacher_forced"][precision][forced_key])
        answers = [data["answers"][precision][k] for k in keys]
        right = [items[i].right(answers[i]) for i in matched]
        free = (free_text_scores([answers[i] for i in texts], [items[i].references for i in texts])
                if texts else None)  # fmt: skip
        agree = agreement(base, answers)
        rows.append(PrecisionQuality(
            precision=precision, reference=reference, file_bytes=data["file_bytes"][precision],
            positions=forced.positions, mean_kl=forced.mean_kl,
            top1_agreement=forced.top1_agreement, perplexity_ratio=forced.perplexity_ratio,
            items=len(matched), right=sum(right), accuracy=wilson(sum(right), len(matched)),
            paired=paired_drop(base_right, right), text_items=len(texts),
            bleu=free.bleu if free else 0.0, chrf=free.chrf if free else 0.0,
            exact_match=agree.exact_match, consistency_chrf=agree.chrf,
        ))  # fmt: skip
    return QualityTable(model=name, reference=reference, rows=tuple(rows))


def cached(model: Path, root: Path | None = None) -> QualityTable | None:
    """The table of every precision of `model` already measured on the shipped set and text
    (by `wattops quality`, the bench...), read from the cache without measuring anything;
    None when there is none (no such file, never measured, or measured by another method)."""
    try:
        reference = precision_of(model)
        path = (cache_dir() if root is None else root) / "quality" / f"{model_identity(model)}.json"
    except Exception:  # a missing or unreadable model file: nothing cached for it
        return None
    data = _read_cache(path, reference)
    items = labelled_set()
    forced_key = text_key(evaluation_text(), N_CTX)
    keys = [item_key(item) for item in items]

    def complete(p: str) -> bool:
        return (forced_key in data["teacher_forced"].get(p, {}) and p in data["file_bytes"]
                and all(k in data["answers"].get(p, {}) for k in keys))  # fmt: skip

    if not complete(reference):
        return None
    done = [p for p in data["answers"] if complete(p)]
    return _table(model.name, reference, data, done, items, forced_key)
