"""What a precision costs in quality, measured one way for every part of wattops that needs it
(`wattops quality`, the bench, the router, verified switching, a canary's probes): task
accuracy on a shipped labelled set with confidence intervals, the paired accuracy drop against
the base, BLEU/chrF against references, and the teacher-forced figures on a shipped text,
cached per model file. Headless; imports the engines (to build variants and serve answers) and
nothing above them."""

from wattops.quality.answers import answer_items, request_body
from wattops.quality.intervals import Interval, PairedDrop, items_for_margin, paired_drop, wilson
from wattops.quality.labelled import (
    FreeTextScores,
    LabelledItem,
    free_text_scores,
    is_right,
    labelled_set,
    normalise,
)
from wattops.quality.table import (
    DEFAULT_PRECISIONS,
    VERDICTS,
    PrecisionQuality,
    QualityFloor,
    QualityTable,
    cached,
    evaluation_text,
    measure,
)
from wattops.quality.teacher_forced import TeacherForced, compare, compare_logits, teacher_forced

__all__ = [
    "DEFAULT_PRECISIONS",
    "VERDICTS",
    "FreeTextScores",
    "Interval",
    "LabelledItem",
    "PairedDrop",
    "PrecisionQuality",
    "QualityFloor",
    "QualityTable",
    "TeacherForced",
    "answer_items",
    "cached",
    "compare",
    "compare_logits",
    "evaluation_text",
    "free_text_scores",
    "is_right",
    "items_for_margin",
    "labelled_set",
    "measure",
    "normalise",
    "paired_drop",
    "request_body",
    "teacher_forced",
    "wilson",
]
