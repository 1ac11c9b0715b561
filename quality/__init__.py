"""What a precision costs in quality, measured one way for every part of wattops that needs it
(`wattops quality`, the bench, the router, verified switching): teacher-forced agreement with
the base on a shipped text, and answer-level agreement on a shipped prompt set, cached per
model file. Headless; imports the engines (to build variants) and nothing above them."""

from wattops.quality.answers import AnswerAgreement, agreement, greedy_answers
from wattops.quality.table import (
    DEFAULT_PRECISIONS,
    PrecisionQuality,
    QualityFloor,
    QualityTable,
    cached,
    evaluation_prompts,
    evaluation_text,
    measure,
)
from wattops.quality.teacher_forced import TeacherForced, compare, compare_logits, teacher_forced

__all__ = [
    "DEFAULT_PRECISIONS",
    "AnswerAgreement",
    "PrecisionQuality",
    "QualityFloor",
    "QualityTable",
    "TeacherForced",
    "agreement",
    "cached",
    "compare",
    "compare_logits",
    "evaluation_prompts",
    "evaluation_text",
    "greedy_answers",
    "measure",
    "teacher_forced",
]
