"""Model variants: built with llama.cpp's quantizer, written atomically, never served corrupt."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from wattops.engines.base import EngineError
from wattops.engines.variants import (
    CorruptModelError,
    VariantStore,
    check_gguf,
    precision_of,
    quantizable_from,
    quantize,
)


def test_the_base_model_reports_its_precision(test_model: Path) -> None:
    assert precision_of(test_model) == "f16"
    assert quantizable_from("f16")[:3] == ["f16", "q8_0", "q6_k"]
    assert "f32" not in quantizable_from("f16")


def test_quantize_writes_a_smaller_valid_file_and_no_temporaries(
    test_model: Path, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "m.q4_0.gguf"
    quantize(test_model, target, "q4_0")
    assert precision_of(target) == "q4_0"
    assert target.stat().st_size < test_model.stat().st_size
    assert [p.name for p in target.parent.iterdir()] == ["m.q4_0.gguf"]


def test_a_truncated_file_is_detected(test_model: Path, tmp_path: Path) -> None:
    torn = tmp_path / "torn.gguf"
    data = test_model.read_bytes()
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match=r"torn\.gguf"):
        check_gguf(torn)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(CorruptModelError):
        check_gguf(junk)


def test_unknown_precision_is_refused(test_model: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="q4_k_m"):
        quantize(test_model, tmp_path / "x.gguf", "q7_z")
    assert not (tmp_path / "x.gguf").exists()


def test_store_builds_once_and_rebuilds_a_corrupt_variant(test_model: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.gguf"
    shutil.copy(test_model, base)
    store = VariantStore(tmp_path / "variants")
    path = asyncio.run(store.ensure(base, "q8_0"))
    assert precision_of(path) == "q8_0"
    built_at = path.stat().st_mtime_ns
    assert asyncio.run(store.ensure(base, "q8_0")) == path
    assert path.stat().st_mtime_ns == built_at  # cached, not rebuilt

    # Damage it as a crash of some other writer would; the store must not serve it.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    again = asyncio.run(store.ensure(base, "q8_0"))
    assert again == path
    check_gguf(again)
