"""wattops.quality: the labelled set and its scorer, the confidence intervals, teacher-forced
figures, the cached table, the floor, and `wattops quality` — on the random-weight test model
(fast; its answers are word salad, which makes the caching and the plumbing testable; the
figures that matter are SmolLM2's, in docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sacrebleu.metrics import BLEU, CHRF

import wattops.quality.table as table_module
from wattops.console.cli import main as cli_main
from wattops.engines.variants import quantize
from wattops.quality import (
    Interval,
    LabelledItem,
    PrecisionQuality,
    QualityFloor,
    QualityTable,
    answer_items,
    compare,
    compare_logits,
    evaluation_text,
    free_text_scores,
    is_right,
    items_for_margin,
    labelled_set,
    measure,
    normalise,
    paired_drop,
    wilson,
)
from wattops.quality.labelled import parse_items, probe_sample

SHORT_TEXT = evaluation_text()[:1500]
#: A few items of each kind, for the tests that run a model.
SHORT_ITEMS = (*[i for i in labelled_set() if i.matched][:4],
               *[i for i in labelled_set() if not i.matched][:2])  # fmt: skip


# -- teacher-forced ------------------------------------------------------------------------
def test_identical_logits_agree_fully() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 20))
    nxt = rng.integers(0, 20, size=50)
    sums = compare_logits(logits, logits.copy(), nxt)
    assert sums.kl == pytest.approx(0.0, abs=1e-12)
    assert sums.agree == 50
    assert sums.nll_reference == pytest.approx(sums.nll_candidate)


def test_kl_top1_and_perplexity_by_hand() -> None:
    # Two positions, three tokens. Reference p = softmax(log [0.7, 0.2, 0.1]).
    ref = np.log([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    cand = np.log([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
    nxt = [0, 1]
    sums = compare_logits(ref, cand, nxt)
    kl0 = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3)
    kl1 = 0.5 * math.log(0.5 / 0.2) + 0.2 * math.log(0.2 / 0.5)
    assert sums.kl == pytest.approx(kl0 + kl1)
    assert sums.agree == 1  # argmax 0/0 at the first position, 0/2 at the second
    assert sums.nll_reference == pytest.approx(-(math.log(0.7) + math.log(0.3)))
    assert sums.nll_candidate == pytest.approx(-(math.log(0.6) + math.log(0.3)))


def test_compare_logits_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="positions, vocab"):
        compare_logits(np.zeros((3, 4)), np.zeros((3, 5)), [0, 1, 2])


def test_quality_of_real_variants_on_the_test_model(test_model: Path, tmp_path: Path) -> None:
    itself = compare(test_model, test_model, SHORT_TEXT, n_ctx=128, threads=1)
    assert itself.positions > 128  # the text spans several windows, each scored
    assert itself.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert itself.top1_agreement == 1.0
    assert itself.perplexity_ratio == pytest.approx(1.0)
    q8, q4 = tmp_path / "t.q8_0.gguf", tmp_path / "t.q4_0.gguf"
    quantize(test_model, q8, "q8_0")
    quantize(test_model, q4, "q4_0")
    r8 = compare(test_model, q8, SHORT_TEXT, n_ctx=128, threads=1)
    r4 = compare(test_model, q4, SHORT_TEXT, n_ctx=128, threads=1)
    # Coarser rounding moves the distributions further from the reference.
    assert 0 < r8.mean_kl < r4.mean_kl
    assert r4.top1_agreement <= r8.top1_agreement
    assert r4.top1_agreement < 1.0


def test_the_shipped_data() -> None:
    items = labelled_set()
    assert len(items) >= 500 and len({i.id for i in items}) == len(items)
    tasks = Counter(i.task for i in items)
    assert tasks == {"capitals": 80, "facts": 100, "arithmetic": 100, "units": 60, "lists": 60,
                     "translation": 60, "rewrite": 40}  # fmt: skip
    for item in items:
        assert item.matched == bool(item.answers) != bool(item.references)
        if item.matched:  # the prompt never gives the answer away
            assert not item.right(item.prompt), item
            assert item.right(item.answers[0]), item  # and the canonical answer is right
    text = evaluation_text()
    assert text.startswith("CHAPTER 1. Loomings.") and "Call me Ishmael." in text
    assert len(text.split()) > 3000  # a few thousand tokens


# -- the scorer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("The capital of France is PARIS!", ["the", "capital", "of", "france", "is", "paris"]),
        ("São Paulo, Zürich; Bogotá.", ["sao", "paulo", "zurich", "bogota"]),
        ("It weighs 1,000 grams.", ["it", "weighs", "1000", "grams"]),
        ("Twenty-one", ["21"]),
        ("one hundred and five days", ["105", "days"]),
        ("5.0 km or 0.50 m", ["5", "km", "or", "0.5", "m"]),
        ("e.g. the end.", ["e", "g", "the", "end"]),
        ("snake_case", ["snake", "case"]),
    ],
)
def test_normalisation_of_casing_punctuation_accents_and_numbers(
    text: str, words: list[str]
) -> None:
    assert normalise(text) == words


@pytest.mark.parametrize(
    ("answer", "accepted", "prompt", "right"),
    [
        ("The capital of France is Paris.", ["Paris"], "", True),
        ("paris", ["Paris"], "", True),
        ("Parisian food", ["Paris"], "", False),  # whole words only
        ("Washington, D.C.", ["Washington, D.C.", "Washington"], "", True),
        ("It is in D.C.", ["Washington, D.C."], "", False),
        ("Kiev", ["Kyiv", "Kiev"], "", True),
        ("7 x 8 = 56", ["56"], "What is 7 x 8?", True),
        ("6 weeks is 6 * 7 = 42 days", ["42"], "How many days are in 6 weeks?", True),
        ("42, or maybe 44", ["42"], "What is 6 x 7?", False),  # the last new number counts
        ("fifty-six", ["56"], "What is 7 x 8?", True),
        ("56.0", ["56"], "What is 7 x 8?", True),
        ("1,000 grams", ["1000"], "How many grams in a kilogram?", True),
        ("7 x 8", ["56"], "What is 7 x 8?", False),  # only the prompt's numbers: its last one
        ("I do not know.", ["56"], "What is 7 x 8?", False),  # no number at all
        ("8", ["8"], "What is 2 + 6? Then 8.", True),  # every number in the prompt: its last
    ],
)
def test_an_answer_is_right_when_it_gives_an_accepted_answer(
    answer: str, accepted: list[str], prompt: str, right: bool
) -> None:
    assert is_right(answer, accepted, prompt) is right


def test_free_text_is_scored_by_sacrebleu_against_every_reference() -> None:
    answers = ["Je parle français.", "I walked to school yesterday."]
    refs = [("Je parle français.",), ("I walked to school.", "I went to school.")]
    got = free_text_scores(answers, refs)
    streams = [["Je parle français.", "I walked to school."],
               ["Je parle français.", "I went to school."]]  # fmt: skip
    assert got.items == 2
    assert got.bleu == pytest.approx(BLEU().corpus_score(answers, streams).score)
    assert got.chrf == pytest.approx(CHRF().corpus_score(answers, streams).score)
    assert free_text_scores(["Bonjour."], [("Bonjour.",)]).chrf == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one answer and at least one reference"):
        free_text_scores(["a"], [()])


def test_a_bad_labelled_line_is_named() -> None:
    good = '{"id": "x-1", "task": "facts", "prompt": "Q?", "answers": ["A"]}'
    assert parse_items([good])[0] == LabelledItem("x-1", "facts", "Q?", ("A",))
    for line, said in (
        ("{not json", "line 1: not JSON"),
        ('{"id": "x", "task": "poetry", "prompt": "Q", "answers": ["A"]}', "task 'poetry'"),
        ('{"id": "x", "task": "facts", "prompt": "Q"}', "facts needs a non-empty list answers"),
        ('{"id": "x", "task": "rewrite", "prompt": "Q", "answers": ["A"]}',
         "rewrite needs a non-empty list references"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=said):
            parse_items([line])
    with pytest.raises(ValueError, match="line 2: a unique non-empty id"):
        parse_items([good, good])


def test_probes_are_a_fixed_sample_of_every_task() -> None:
    probes = probe_sample(200)
    assert probes == probe_sample(200) and probe_sample(50) == probes[:50]
    assert all(p.matched for p in probes) and len(set(probes)) == 200
    assert {p.task for p in probes} == {"capitals", "facts", "arithmetic", "units", "lists"}
    with pytest.raises(ValueError, match=r"probes must be 0\.\.400"):
        probe_sample(401)


# -- confidence intervals ------------------------------------------------------------------


def test_wilson_interval_of_a_known_case() -> None:
    # 8 of 10: the textbook Wilson 95% interval is [0.4902, 0.9433].
    got = wilson(8, 10)
    assert got.estimate == 0.8
    assert (got.low, got.high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson(0, 20).low == 0.0 and wilson(20, 20).high == 1.0
    with pytest.raises(ValueError):
        wilson(3, 0)


def test_paired_drop_interval_of_a_known_case() -> None:
    # 100 items: 60 right on both, 10 only on the reference, 2 only on the candidate, 28 on
    # neither. Drop = (10 - 2) / 100 = 8 points. Agresti-Min: cells + 0.5, n + 2 = 102:
    # d = (10.5 - 2.5) / 102 = 0.0784314; se = sqrt(13 - 8^2 / 102) / 102 = 0.0344849;
    # 1.959964 * se = 0.0675891: [0.0108423, 0.1460205].
    ref = [True] * 60 + [True] * 10 + [False] * 2 + [False] * 28
    cand = [True] * 60 + [False] * 10 + [True] * 2 + [False] * 28
    got = paired_drop(ref, cand)
    cells = (got.both_right, got.reference_only, got.candidate_only, got.both_wrong)
    assert cells == (60, 10, 2, 28)
    assert got.drop.estimate == pytest.approx(0.08)
    assert got.drop.low == pytest.approx(0.0108423, abs=1e-6)
    assert got.drop.high == pytest.approx(0.1460205, abs=1e-6)
    # The same answers both sides: no drop, and still an interval (plain Wald would be 0 wide).
    same = paired_drop([True, False] * 50, [True, False] * 50).drop
    assert same.estimate == 0.0 and same.low < 0 < same.high
    # A candidate that gets more right has a negative drop.
    assert paired_drop(cand, ref).drop.estimate == pytest.approx(-0.08)
    with pytest.raises(ValueError, match="one candidate outcome per reference outcome"):
        paired_drop([True], [True, False])


def test_items_needed_for_a_margin() -> None:
    assert items_for_margin(0.015, 0.10) == 1708  # (1.96 / 0.015)^2 * 0.1 = 1707.3
    assert items_for_margin(0.05, 0.10) == 154
    with pytest.raises(ValueError):
        items_for_margin(0, 0.1)


# -- answers through llama-server -----------------------------------------------------------


def test_answers_are_deterministic_and_a_coarser_precision_differs(
    test_model: Path, tmp_path: Path
) -> None:
    first = answer_items(test_model, SHORT_ITEMS, threads=1)
    again = answer_items(test_model, SHORT_ITEMS, threads=1)
    assert first == again and len(first) == len(SHORT_ITEMS) and all(first)
    q4 = tmp_path / "t.q4_0.gguf"
    quantize(test_model, q4, "q4_0")
    assert answer_items(q4, SHORT_ITEMS, threads=1) != first  # random weights: new word salad


# -- the table, its cache and the floor ----------------------------------------------------


def _row(precision: str, size: int, drop: float, low: float, high: float,
         kl: float = 0.01) -> PrecisionQuality:  # fmt: skip
    paired = paired_drop([True] * 50 + [False] * 50, [True] * 50 + [False] * 50)
    paired = type(paired)(**{**paired.__dict__,
                             "drop": Interval(drop / 100, low / 100, high / 100)})  # fmt: skip
    return PrecisionQuality(
        precision=precision, reference="f16", file_bytes=size, positions=100, mean_kl=kl,
        top1_agreement=0.9, perplexity_ratio=1.01, items=100, right=50,
        accuracy=wilson(50, 100), paired=paired, text_items=10, bleu=20.0, chrf=40.0,
        exact_match=0.3, consistency_chrf=60.0,
    )  # fmt: skip


def test_the_cheapest_precision_that_meets_the_floor_is_chosen() -> None:
    table = QualityTable("m.gguf", "f16", (
        _row("f16", 1000, 0.0, 0.0, 0.0, kl=0.0), _row("q8_0", 530, 0.5, -2.0, 3.0, kl=0.004),
        _row("q5_k_m", 360, 2.0, -1.0, 5.0, kl=0.09), _row("q4_0", 300, 9.0, 4.0, 14.0, kl=0.3),
    ))  # fmt: skip
    assert QualityFloor().verdict == "bound"  # the default: shown, not merely estimated
    chosen, why = table.cheapest(QualityFloor(verdict="point"))
    assert chosen.precision == "q8_0"  # q5_k_m loses 2.0 points, q4_0 9.0
    assert "q5_k_m (accuracy drop 2.0 [-1.0, 5.0] points > 1.5)" in why
    assert "q4_0 (accuracy drop 9.0 [4.0, 14.0] points > 1.5)" in why
    assert "drop 0.5 [-2.0, 3.0] points over 100 items" in why
    assert table.cheapest(QualityFloor(2.5, verdict="point"))[0].precision == "q5_k_m"
    # A KL bound on top: q5_k_m's 0.09 is too much for 0.05.
    chosen, why = table.cheapest(QualityFloor(2.5, max_kl=0.05, verdict="point"))
    assert chosen.precision == "q8_0" and "KL 0.0900 > 0.05 nats/token" in why
    # Non-inferiority: the whole interval must be within the margin; q8_0's reaches 3.0.
    chosen, why = table.cheapest(QualityFloor(1.5))
    assert chosen.precision == "f16"
    assert "q8_0 (upper bound of the accuracy drop 0.5 [-2.0, 3.0] points > 1.5)" in why
    assert table.cheapest(QualityFloor(3.0))[0].precision == "q8_0"
    # Nothing but the reference meets a floor of perfection: the reference is chosen.
    assert table.cheapest(QualityFloor(0.0))[0].precision == "f16"
    with pytest.raises(ValueError, match=r"0\.\.100 points"):
        QualityFloor(max_accuracy_drop=-1)
    with pytest.raises(ValueError, match="KL bound"):
        QualityFloor(max_kl=-0.1)
    with pytest.raises(ValueError, match="none of point, bound"):
        QualityFloor(verdict="mean")  # type: ignore[arg-type]


def test_measure_caches_per_model_file_and_item(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(test_model.read_bytes())
    answered: list[tuple[str, int]] = []
    real = table_module.answer_items

    def counted(path: Path, items: list[LabelledItem], *args: object) -> list[str]:
        answered.append((path.name, len(items)))
        return real(path, items, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(table_module, "answer_items", counted)
    root = tmp_path / "cache"

    def run(precisions: tuple[str, ...], items: tuple[LabelledItem, ...] = SHORT_ITEMS
            ) -> QualityTable:  # fmt: skip
        return measure(model, precisions, root=root, threads=1, text=SHORT_TEXT, items=items)

    first = run(("f16", "q8_0"))
    assert [r.precision for r in first.rows] == ["f16", "q8_0"]
    f16 = first.row("f16")
    assert f16.top1_agreement == 1.0 and f16.exact_match == 1.0 and f16.consistency_chrf == 100
    assert f16.paired.discordant == 0 and f16.drop_points.estimate == 0.0
    assert (f16.items, f16.text_items) == (4, 2)
    q8 = first.row("q8_0")
    assert q8.file_bytes < f16.file_bytes and q8.mean_kl > 0
    assert q8.drop_points.low <= q8.drop_points.estimate <= q8.drop_points.high
    assert 0 <= q8.accuracy.low <= q8.accuracy.estimate <= q8.accuracy.high <= 1
    assert answered == [("m.gguf", 6), ("m.q8_0.gguf", 6)]
    # Asked again, and for a subset: nothing is answered again, the figures are the same.
    assert run(("q8_0",)).row("q8_0") == q8
    assert len(answered) == 2
    # A new precision: only that one answers (the reference's answers are in the cache).
    run(("f16", "q4_0"))
    assert answered[2:] == [("m.q4_0.gguf", 6)]
    # One more item: only that item is asked, of each precision measured.
    extra = LabelledItem("extra-1", "facts", "How many legs does a cat have?", ("4",))
    run(("f16", "q8_0"), (*SHORT_ITEMS, extra))
    assert answered[3:] == [("m.gguf", 1), ("m.q8_0.gguf", 1)]
    # A corrupt cache file is measured again, not trusted.
    (cache,) = (root / "quality").glob("*.json")
    cache.write_text("{not json")
    assert run(("q8_0",)).row("q8_0") == q8
    assert answered[5:] == [("m.gguf", 6), ("m.q8_0.gguf", 6)]
    # A changed model file is a new identity.
    os.utime(model, ns=(1, 1))
    run(("f16",))
    assert answered[7:] == [("m.gguf", 6)]


def test_measure_refuses_a_precision_the_base_cannot_become(
    test_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"cannot measure f32 .* allowed: f16, q8_0"):
        measure(test_model, ("f32",), root=tmp_path)
    assert not (tmp_path / "quality").exists()


def test_wattops_quality_prints_the_table_and_json(
    test_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(table_module, "labelled_set", lambda: SHORT_ITEMS)
    args = ["quality", str(test_model), "--precisions", "f16,q4_0", "--cache-dir",
            str(tmp_path), "--threads", "1", "--max-kl", "0.01"]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        cli_main(args)
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "| q4_0 |" in text and "Cheapest meeting it: f16" in text
    assert "Accuracy % [95% CI] | Drop points [95% CI]" in text
    with pytest.raises(SystemExit):
        cli_main([*args, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert set(data["precisions"]) == {"f16", "q4_0"}
    q4 = data["precisions"]["q4_0"]
    assert 0 < q4["top1_agreement"] < 1 and math.isfinite(q4["chrf"])
    assert q4["drop_low"] <= q4["drop_points"] <= q4["drop_high"] and q4["items"] == 4
    assert data["floor"] == {"max_accuracy_drop": 1.5, "max_kl": 0.01, "verdict": "bound"}
    assert data["cheapest_meeting_floor"] == "f16"  # random weights: KL far above 0.01
    assert "KL " in data["why"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precisions", "q3_x"], "unknown precision q3_x; allowed: "),
        (["--max-accuracy-drop", "x"], "must be accuracy points between 0 and 100, not 'x'"),
        (["--max-accuracy-drop", "101"], "must be accuracy points between 0 and 100"),
        (["--max-kl", "-1"], "must be nats per token, 0 or more"),
        (["--verdict", "mean"], "invalid choice: 'mean' (choose from 'point', 'bound')"),
        (["--min-top1", "0.9"], "--min-top1 is gone: the quality floor is task accuracy"),
        (["--max-chrf-drop", "1.5"], "use --max-accuracy-drop POINTS"),
    ],
)
def test_wattops_quality_names_bad_arguments(
    test_model: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["quality", str(test_model), *extra])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_wattops_quality_on_a_missing_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["quality", "no/such.gguf"])
    assert done.value.code == 2
    assert "no/such.gguf: no such file" in capsys.readouterr().err
