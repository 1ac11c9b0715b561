"""Real questions and instructions for load: what the demo and the bench ask a trained model.

Written for wattops: short factual questions, small arithmetic, lists, rewrites, definitions,
translations and one-sentence explanations, each a template with slots, so a run of a thousand
requests can be all distinct without repeating by chance (the workload's `repeat_fraction`
decides the repeats). A fixed draw order makes the text a pure function of the draws.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

__all__ = ["Draw", "SeededDraw", "question"]


class Draw(Protocol):
    """The random draws a question needs (the load generator's uniform stream)."""

    def index(self, n: int) -> int: ...

    def integer(self, low: int, high: int) -> int: ...


class SeededDraw:
    """Draws from Python's generator seeded with `seed`: one question per seed, for scripts
    that want a repeatable question without the load generator's stream."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def index(self, n: int) -> int:
        return self.rng.randrange(n)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)


def _pick(draw: Draw, options: tuple[str, ...]) -> str:
    return options[draw.index(len(options))]


_COUNTRIES = (
    "France", "Japan", "Italy", "Spain", "Germany", "Canada", "Egypt", "Australia", "Brazil",
    "Mexico", "India", "China", "Russia", "Portugal", "Greece", "Norway", "Sweden", "Finland",
    "Poland", "Ireland", "Kenya", "Argentina", "Chile", "Peru", "Turkey", "Austria", "Belgium",
    "the Netherlands", "Switzerland", "Denmark", "Thailand", "Vietnam", "South Korea", "Cuba",
    "Morocco", "Nigeria", "Hungary", "Iceland", "New Zealand", "the United Kingdom",
)  # fmt: skip
_CATEGORIES = (
    "fruits", "vegetables", "colours", "animals that live on a farm", "birds", "planets",
    "musical instruments", "sports played with a ball", "kitchen tools", "things found in an "
    "office", "programming languages", "European countries", "flowers", "trees", "insects",
    "tools a gardener uses", "ways to save water", "ways to save energy at home",
    "healthy breakfast foods", "board games", "jobs in a hospital", "parts of a car",
    "things to pack for a beach trip", "rivers", "winter clothes", "types of weather",
)  # fmt: skip
_COUNTS = ("two", "three", "four", "five")
_SENTENCES = (
    "I walk to the store.", "She writes a letter to her friend.", "The team fixes the server.",
    "We cook dinner together.", "He reads the report before the meeting.",
    "The children play in the park.", "They build a new bridge.", "The dog chases the ball.",
    "I send the invoice to the customer.", "The engineer restarts the service.",
    "My sister paints the kitchen.", "The train leaves the station.",
    "We plant tomatoes in the garden.", "The teacher explains the lesson.",
    "The wind shakes the old tree.", "Our neighbours sell their car.",
    "The company opens a new office.", "I answer the emails in the morning.",
)  # fmt: skip
_STYLES = (
    "the past tense",
    "the future tense",
    "the passive voice",
    "a more polite way",
    "fewer words",
    "the form of a question",
)
_WORDS = (
    "generous", "ancient", "fragile", "curious", "brave", "enormous", "gentle", "humble",
    "rapid", "silent", "patient", "honest", "narrow", "vivid", "rare", "loyal", "clumsy",
    "eager", "fierce", "polite", "harvest", "volcano", "glacier", "orchestra", "library",
    "harbour", "telescope", "recipe", "budget", "journey",
)  # fmt: skip
_ADJECTIVES = (
    "happy", "big", "fast", "light", "cold", "easy", "quiet", "strong", "bright", "old", "rich",
    "clean", "early", "hard", "kind", "wet", "full", "high", "soft", "warm",
)  # fmt: skip
_PHRASES = (
    "hello", "thank you", "good morning", "good night", "please", "how are you",
    "see you tomorrow", "where is the station", "I am hungry", "the weather is nice",
    "happy birthday", "excuse me",
)  # fmt: skip
_LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch")
_TOPICS = (
    "what a battery does", "why the sky is blue", "what photosynthesis is", "how a rainbow "
    "forms", "what a computer mouse is", "why leaves change colour in autumn", "how a bicycle "
    "works", "what gravity is", "why we have seasons", "what a volcano is", "how bees make "
    "honey", "what a cloud is made of", "why the sea is salty", "what a calendar is for",
    "how a thermometer works", "what electricity is", "why ice floats", "what a map shows",
    "how plants drink water", "what a password is for", "why the moon changes shape",
    "what recycling means",
)  # fmt: skip
_UNITS = (
    ("kilometres", "metres"), ("metres", "centimetres"), ("hours", "minutes"),
    ("minutes", "seconds"), ("kilograms", "grams"), ("litres", "millilitres"),
    ("days", "hours"), ("weeks", "days"),
)  # fmt: skip


def _country(draw: Draw) -> str:
    country = _pick(draw, _COUNTRIES)
    kind = draw.index(4)
    if kind == 0:
        return f"What is the capital of {country}?"
    if kind == 1:
        return f"Which continent is {country} in?"
    if kind == 2:
        return f"What language is spoken in {country}?"
    return f"Name a famous food from {country}."


def _arithmetic(draw: Draw) -> str:
    a, b = draw.integer(2, 99), draw.integer(2, 99)
    kind = draw.index(4)
    if kind == 0:
        return f"What is {a} plus {b}?"
    if kind == 1:
        return f"What is {max(a, b)} minus {min(a, b)}?"
    if kind == 2:
        return f"What is {a % 13 + 2} times {b % 11 + 2}?"
    divisor = b % 9 + 2
    return f"What is {divisor * (a % 12 + 1)} divided by {divisor}?"


def _list(draw: Draw) -> str:
    return f"List {_pick(draw, _COUNTS)} {_pick(draw, _CATEGORIES)}."


def _rewrite(draw: Draw) -> str:
    return f"Rewrite this sentence in {_pick(draw, _STYLES)}: {_pick(draw, _SENTENCES)}"


def _definition(draw: Draw) -> str:
    word = _pick(draw, _WORDS)
    kind = draw.index(3)
    if kind == 0:
        return f"What does the word {word} mean?"
    if kind == 1:
        return f"Use the word {word} in a short sentence."
    return f"Spell the word {word} backwards."


def _synonym(draw: Draw) -> str:
    kind = _pick(draw, ("a synonym", "an antonym", "the comparative form", "a rhyme"))
    return f"Give {kind} for {_pick(draw, _ADJECTIVES)}."


def _translation(draw: Draw) -> str:
    return f"Translate {_pick(draw, _PHRASES)} into {_pick(draw, _LANGUAGES)}."


def _explanation(draw: Draw) -> str:
    how = _pick(draw, ("in one sentence", "to a child", "in simple words", "in two sentences"))
    return f"Explain {_pick(draw, _TOPICS)} {how}."


def _conversion(draw: Draw) -> str:
    big, small = _UNITS[draw.index(len(_UNITS))]
    return f"Convert {draw.integer(2, 12)} {big} to {small}."


_FAMILIES: tuple[Callable[[Draw], str], ...] = (
    _country, _arithmetic, _arithmetic, _list, _rewrite, _definition, _synonym, _translation,
    _explanation, _conversion,
)  # fmt: skip


def question(draw: Draw) -> str:
    """One question or instruction (arithmetic is drawn twice as often: most variety)."""
    return _FAMILIES[draw.index(len(_FAMILIES))](draw)
