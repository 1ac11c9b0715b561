"""wattops.quality: teacher-forced and answer-level agreement with the base precision, the
cached table, the quality floor, and `wattops quality` — on the random-weight test model
(fast; its figures are poor, which is what makes the floor's refusals testable)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from sacrebleu.metrics import CHRF

import wattops.quality.table as table_module
from wattops.console.cli import main as cli_main
from wattops.engines.variants import quantize
from wattops.quality import (
    PrecisionQuality,
    QualityFloor,
    QualityTable,
    agreement,
    compare,
    compare_logits,
    evaluation_prompts,
    evaluation_text,
    greedy_answers,
    measure,
)

SHORT_TEXT = evaluation_text()[:1500]
SHORT_PROMPTS = evaluation_prompts()[:6]


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
    assert len(evaluation_prompts()) >= 100
    assert len(set(evaluation_prompts())) == len(evaluation_prompts())
    text = evaluation_text()
    assert text.startswith("CHAPTER 1. Loomings.") and "Call me Ishmael." in text
    assert len(text.split()) > 3000  # a few thousand tokens


# -- answer-level --------------------------------------------------------------------------


def test_identical_answers_agree_fully() -> None:
    answers = ["Paris.", "The capital of Japan is Tokyo.", ""]
    same = agreement(answers, list(answers))
    assert same.exact_match == 1.0 and same.chrf == 100.0 and same.chrf_drop == 0.0


def test_answer_agreement_is_exact_match_and_sacrebleu_chrf() -> None:
    reference = ["The capital of France is Paris.", "Four.", "Red, yellow and blue."]
    candidate = ["The capital of France is Paris.", "4", "Red, green and blue."]
    got = agreement(reference, candidate)
    assert got.prompts == 3
    assert got.exact_match == pytest.approx(1 / 3)
    assert got.chrf == pytest.approx(CHRF().corpus_score(candidate, [reference]).score)
    assert 0 < got.chrf < 100 and got.chrf_drop == pytest.approx(100 - got.chrf)
    # Surrounding whitespace is not a difference in the answer.
    assert agreement(["Paris."], [" Paris.\n"]).exact_match == 1.0


def test_answer_agreement_needs_one_answer_per_prompt() -> None:
    with pytest.raises(ValueError, match="one candidate answer per reference answer"):
        agreement(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        agreement([], [])


def test_greedy_answers_are_deterministic_and_a_coarser_precision_agrees_less(
    test_model: Path, tmp_path: Path
) -> None:
    first = greedy_answers(test_model, SHORT_PROMPTS, max_tokens=12, threads=1)
    again = greedy_answers(test_model, SHORT_PROMPTS, max_tokens=12, threads=1)
    assert first == again and all(first)
    assert agreement(first, again).chrf == 100.0
    q4 = tmp_path / "t.q4_0.gguf"
    quantize(test_model, q4, "q4_0")
    coarse = agreement(first, greedy_answers(q4, SHORT_PROMPTS, max_tokens=12, threads=1))
    # Random weights: rounding to 4 bits changes the word salad.
    assert coarse.chrf < 100.0 and coarse.exact_match < 1.0
    with pytest.raises(ValueError, match="max_tokens"):
        greedy_answers(test_model, SHORT_PROMPTS, max_tokens=0)


# -- the table, its cache and the floor ----------------------------------------------------


def _row(precision: str, size: int, top1: float, chrf: float) -> PrecisionQuality:
    return PrecisionQuality(precision, "f16", size, 100, 0.01, top1, 1.0, 10, 0.5, chrf)


def test_the_cheapest_precision_that_meets_the_floor_is_chosen() -> None:
    table = QualityTable("m.gguf", "f16", (
        _row("f16", 1000, 1.0, 100.0), _row("q8_0", 530, 0.97, 99.0),
        _row("q5_k_m", 360, 0.93, 98.0), _row("q4_0", 300, 0.80, 90.0),
    ))  # fmt: skip
    chosen, why = table.cheapest(QualityFloor())
    assert chosen.precision == "q8_0"  # q5_k_m loses 2.0 chrF points, q4_0 both
    assert "q5_k_m (chrF drop 2.00 > 1.5 points)" in why
    assert "q4_0 (top-1 agreement 80.0% < 90%; chrF drop 10.00 > 1.5 points)" in why
    assert table.cheapest(QualityFloor(0.9, 2.5))[0].precision == "q5_k_m"
    # Nothing but the reference meets a floor of perfection: the reference is chosen.
    assert table.cheapest(QualityFloor(1.0, 0.0))[0].precision == "f16"
    with pytest.raises(ValueError, match="between 0 and 1"):
        QualityFloor(top1_agreement=90)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        QualityFloor(chrf_drop=-1)


def test_measure_caches_per_model_file_and_method(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(test_model.read_bytes())
    answered: list[str] = []
    real = table_module.greedy_answers

    def counted(path: Path, *args: object, **kwargs: object) -> list[str]:
        answered.append(path.name)
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(table_module, "greedy_answers", counted)
    root = tmp_path / "cache"

    def run(precisions: tuple[str, ...], **kw: object) -> QualityTable:
        options: dict[str, object] = {"prompts": SHORT_PROMPTS, **kw}
        return measure(model, precisions, root=root, threads=1, text=SHORT_TEXT, **options)  # type: ignore[arg-type]

    first = run(("f16", "q8_0"))
    assert [r.precision for r in first.rows] == ["f16", "q8_0"]
    f16 = first.row("f16")
    assert f16.top1_agreement == 1.0 and f16.exact_match == 1.0 and f16.chrf_drop == 0.0
    assert first.row("q8_0").file_bytes < f16.file_bytes
    assert len(answered) == 2
    # Asked again, and for a subset: nothing is answered again, the figures are the same.
    assert run(("q8_0",)).row("q8_0") == first.row("q8_0")
    assert len(answered) == 2
    # A new precision: only that one answers (the reference's answers are in the cache).
    run(("f16", "q4_0"))
    assert answered[2:] == ["m.q4_0.gguf"]
    # Other prompts are another method: measured again.
    run(("q8_0",), prompts=SHORT_PROMPTS[:3])
    assert len(answered) == 5
    # A corrupt cache file is measured again, not trusted.
    (cache,) = (root / "quality").glob("*.json")
    cache.write_text("{not json")
    assert run(("q8_0",)).row("q8_0") == first.row("q8_0")
    assert len(answered) == 7
    # A changed model file is a new identity.
    os.utime(model, ns=(1, 1))
    run(("f16",))
    assert len(answered) == 8


def test_measure_refuses_a_precision_the_base_cannot_become(
    test_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"cannot measure f32 .* allowed: f16, q8_0"):
        measure(test_model, ("f32",), root=tmp_path)
    assert not (tmp_path / "quality").exists()


def test_wattops_quality_prints_the_table_and_json(
    test_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quality", str(test_model), "--precisions", "f16,q4_0", "--cache-dir",
            str(tmp_path), "--threads", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        cli_main(args)
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "| q4_0 |" in text and "Cheapest meeting it: f16" in text
    with pytest.raises(SystemExit):
        cli_main([*args, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert set(data["precisions"]) == {"f16", "q4_0"}
    q4 = data["precisions"]["q4_0"]
    assert 0 < q4["top1_agreement"] < 1 and math.isfinite(q4["chrf"])
    assert data["cheapest_meeting_floor"] == "f16"  # random weights miss the floor


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precisions", "q3_x"], "unknown precision q3_x; allowed: "),
        (["--min-top1", "90"], "must be a share between 0 and 1"),
        (["--max-chrf-drop", "x"], "must be chrF points between 0 and 100"),
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
