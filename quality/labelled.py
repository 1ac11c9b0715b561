"""The labelled evaluation set and its scorer: is an answer right?

`data/labelled.jsonl` (written for wattops, Apache-2.0; `data/SOURCES.md`) holds one item per
line: an id, a task, the user message, and either the accepted `answers` (match tasks: short
facts, arithmetic, unit conversions, list tasks) or the `references` (free-text tasks:
translations and rewrites). Match items are scored right or wrong by `is_right`; free-text
items by sacrebleu's BLEU and chrF against their references (`free_text_scores`).

How a match answer is judged (`normalise`, then `is_right`):

1. Both texts are normalised: Unicode compatibility form with accents dropped, lower case,
   thousands separators between digits removed (`1,000` -> `1000`), number words written as
   digits (`twenty-one` -> `21`, `a hundred` stays `a 100`), every other character that is
   not a letter, a digit or a decimal point between digits becomes a space, and numbers are
   written canonically (`5.0` -> `5`, `0.50` -> `0.5`).
2. An accepted answer that is a number is compared as a number with the answer's *last number
   that the prompt does not contain*, the way GSM8K-style scoring reads a worked answer's
   result ("6 weeks is 6 * 7 = 42 days" is right for 42, "42, or maybe 44" is not); when
   every number in the answer is also in the prompt, its last one. No number: wrong.
3. Any other accepted answer is right when its words occur, in order and adjacent, as whole
   words of the answer ("The capital of France is Paris." contains "paris"; "Parisian" does
   not).

Containment is lenient on purpose: a small instruct model answers in a sentence, and "the
answer is right" should not depend on its wording. It cannot be gamed by one precision more
than another: both answer the same items, and the figures that matter are paired.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

__all__ = [
    "MATCH_TASKS",
    "TEXT_TASKS",
    "FreeTextScores",
    "LabelledItem",
    "free_text_scores",
    "is_right",
    "labelled_set",
    "normalise",
    "numbers_in",
    "parse_items",
    "probe_sample",
]

MATCH_TASKS = ("capitals", "facts", "arithmetic", "units", "lists")
TEXT_TASKS = ("translation", "rewrite")


@dataclass(frozen=True)
class LabelledItem:
    """One question with what counts as right (`answers`) or what to compare with
    (`references`); exactly one of the two is non-empty."""

    id: str
    task: str
    prompt: str
    answers: tuple[str, ...] = ()
    references: tuple[str, ...] = ()

    @property
    def matched(self) -> bool:
        """Scored right or wrong (a match task), not by BLEU/chrF."""
        return bool(self.answers)

    def right(self, answer: str) -> bool:
        return is_right(answer, self.answers, self.prompt)


def parse_items(lines: Sequence[str], where: str = "labelled set") -> tuple[LabelledItem, ...]:
    """Items from JSON lines; ValueError naming the line and what is wrong with it."""
    items: list[LabelledItem] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw: Any = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where} line {number}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where} line {number}: an object is needed")
        item_id, task, prompt = raw.get("id"), raw.get("task"), raw.get("prompt")
        answers, references = raw.get("answers", []), raw.get("references", [])
        if not (isinstance(item_id, str) and item_id) or item_id in seen:
            raise ValueError(f"{where} line {number}: a unique non-empty id is needed")
        if task not in (*MATCH_TASKS, *TEXT_TASKS):
            raise ValueError(f"{where} line {number}: task {task!r} is none of "
                             f"{', '.join((*MATCH_TASKS, *TEXT_TASKS))}")  # fmt: skip
        if not (isinstance(prompt, str) and prompt.strip()):
            raise ValueError(f"{where} line {number}: a non-empty prompt is needed")
        texts = answers if task in MATCH_TASKS else references
        field = "answers" if task in MATCH_TASKS else "references"
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t.strip()
                                                          for t in texts)):  # fmt: skip
            raise ValueError(f"{where} line {number}: {task} needs a non-empty list {field}")
        seen.add(item_id)
        items.append(LabelledItem(
            id=item_id, task=task, prompt=prompt,
            answers=tuple(answers) if task in MATCH_TASKS else (),
            references=tuple(references) if task in TEXT_TASKS else (),
        ))  # fmt: skip
    return tuple(items)


@cache
def labelled_set() -> tuple[LabelledItem, ...]:
    """The shipped set, `data/labelled.jsonl`."""
    text = resources.files("wattops.quality").joinpath("data/labelled.jsonl").read_text("utf-8")
    return parse_items(text.splitlines(), "quality/data/labelled.jsonl")


def probe_sample(count: int) -> tuple[LabelledItem, ...]:
    """`count` match items of the shipped set in a fixed shuffled order (seed 0): a canary asks
    the same probes every time, spread over every task, so two canaries' figures compare."""
    import random

    matched = [item for item in labelled_set() if item.matched]
    if not 0 <= count <= len(matched):
        raise ValueError(f"probes must be 0..{len(matched)} (the labelled set's match items), "
                         f"not {count}")  # fmt: skip
    return tuple(random.Random(0).sample(matched, len(matched))[:count])


# -- normalisation -------------------------------------------------------------------------

_UNIT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
_TEN_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety"
_UNITS = {w: i for i, w in enumerate(_UNIT_WORDS.split())}
_TENS = {w: 10 * i for i, w in enumerate(_TEN_WORDS.split(), start=2)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def _number_words(words: list[str]) -> list[str]:
    """Runs of number words as one number each ("twenty one" -> "21", "two hundred" -> "200");
    a scale word alone ("hundred") is left as it is."""
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] not in _UNITS and words[i] not in _TENS:
            out.append(words[i])
            i += 1
            continue
        total = current = 0
        while i < len(words):
            w = words[i]
            if w in _UNITS:
                current += _UNITS[w]
            elif w in _TENS:
                current += _TENS[w]
            elif w in _SCALES and current:
                total += current * _SCALES[w]
                current = 0
            elif w == "and" and i + 1 < len(words) and (words[i + 1] in _UNITS
                                                        or words[i + 1] in _TENS):  # fmt: skip
                pass  # "one hundred and five"
            else:
                break
            i += 1
        out.append(str(total + current))
    return out


def _canonical(token: str) -> str:
    if not _NUMBER.match(token):
        return token
    value = float(token)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def normalise(text: str) -> list[str]:
    """The words of `text` as the scorer compares them (see the module docstring)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # twenty-one -> twenty one
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # a period that is not a decimal point
    text = re.sub(r"[^\w.]+|_", " ", text)
    return [_canonical(w) for w in _number_words(text.split())]


def numbers_in(text: str) -> list[float]:
    """The numbers in `text`, in order, after normalisation."""
    return [float(w) for w in normalise(text) if _NUMBER.match(w)]


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i : i + n] == phrase for i in range(len(words) - n + 1))


def is_right(answer: str, accepted: Sequence[str], prompt: str = "") -> bool:
    """Whether `answer` gives one of the `accepted` answers (see the module docstring)."""
    words = normalise(answer)
    in_prompt = set(numbers_in(prompt))
    numbers = [float(w) for w in words if _NUMBER.match(w)]
    fresh = [x for x in numbers if x not in in_prompt]
    said = fresh[-1] if fresh else (numbers[-1] if numbers else None)
    for option in accepted:
        phrase = normalise(option)
        if len(phrase) == 1 and _NUMBER.match(phrase[0]):
            if said is not None and math.isclose(said, float(phrase[0]), abs_tol=1e-9):
                return True
        elif _contains(words, phrase):
            return True
    return False


# -- free text -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FreeTextScores:
    """sacrebleu corpus BLEU and chrF (0..100) of answers against their references."""

    items: int
    bleu: float
    chrf: float


def free_text_scores(answers: Sequence[str], references: Sequence[Sequence[str]]) -> FreeTextScores:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, exponential smoothing) and chrF
    (character 6-grams, beta 2) of `answers` against each one's references. Items with fewer
    references than the most repeat their first one (a repeated reference changes neither
    score: both take the best match per n-gram)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(answers) != len(references) or not answers or not all(references):
        raise ValueError("need one answer and at least one reference per item, and one item")
    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(width)]
    answers = [a.strip() for a in answers]
    return FreeTextScores(
        items=len(answers),
        bleu=BLEU().corpus_score(answers, streams).score,
        chrf=CHRF().corpus_score(answers, streams).score,
    )
