"""Tests for the tiny random-weight GGUF writer, run against the real llama.cpp."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp
import pytest

from wattops.engines.tiny_model import SIZES, write_tiny_model

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. This is a small test of the tiny model, "
    "and we want to know how many tokens it will use for each word in a long sentence."
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "test.gguf")


@pytest.fixture(scope="module")
def llm(model_path: Path) -> Iterator[llama_cpp.Llama]:
    model = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, n_threads=2, verbose=False)
    yield model
    model.close()


def test_metadata_describes_a_llama_model(llm: llama_cpp.Llama) -> None:
    spec = SIZES["test"]
    meta = llm.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "wattops-tiny-test"
    assert meta["tokenizer.ggml.model"] == "llama"
    assert int(meta["llama.block_count"]) == spec.n_layer
    assert int(meta["llama.embedding_length"]) == spec.n_embd
    assert llm.n_vocab() == spec.n_vocab
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)


def test_greedy_generation_is_deterministic(llm: llama_cpp.Llama) -> None:
    def generate() -> tuple[str, int]:
        out = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
        assert not isinstance(out, Iterator)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    first = generate()
    assert first == generate()
    # End-of-sequence logits are zeroed in the writer, so greedy decoding never stops early.
    assert first[1] == 8


def test_chat_completion_uses_embedded_template(llm: llama_cpp.Llama) -> None:
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    messages: list[llama_cpp.ChatCompletionRequestMessage] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]
    out = llm.create_chat_completion(messages=messages, max_tokens=6, temperature=0.0)
    assert not isinstance(out, Iterator)
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)

    expected_prompt = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nSay hello.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    expected_tokens = llm.tokenize(expected_prompt.encode(), add_bos=False, special=True)
    assert out["usage"]["prompt_tokens"] == len(expected_tokens)


def test_chat_markers_are_single_control_tokens(llm: llama_cpp.Llama) -> None:
    ids = llm.tokenize(b"<|im_start|><|im_end|>", add_bos=False, special=True)
    assert ids == [llm.n_vocab() - 2, llm.n_vocab() - 1]


def test_english_text_needs_fewer_tokens_than_bytes(llm: llama_cpp.Llama) -> None:
    data = ENGLISH.encode()
    tokens = llm.tokenize(data, add_bos=False)
    assert len(tokens) < len(data) / 2


@pytest.mark.parametrize(
    "text",
    [ENGLISH, "héllo wörld ✓", "tabs\tand\nnew lines  with  double spaces", "日本語 🙂 ok"],
)
def test_tokenization_round_trips(llm: llama_cpp.Llama, text: str) -> None:
    data = text.encode()
    tokens = llm.tokenize(data)
    assert tokens[0] == llm.token_bos()
    assert llm.detokenize(tokens) == data


def test_non_ascii_falls_back_to_byte_tokens(llm: llama_cpp.Llama) -> None:
    tokens = llm.tokenize("✓".encode(), add_bos=False)
    byte_tokens = [3 + b for b in "✓".encode()]
    assert tokens[-3:] == byte_tokens


def test_same_seed_gives_identical_file(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a" / "model.gguf", seed=7)
    b = write_tiny_model(tmp_path / "b" / "model.gguf", seed=7)
    c = write_tiny_model(tmp_path / "c" / "model.gguf", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size == c.stat().st_size


def test_write_is_atomic_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "dir" / "model.gguf"
    write_tiny_model(target, seed=1)
    write_tiny_model(target, seed=2)
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]
    assert target.read_bytes() == write_tiny_model(tmp_path / "fresh.gguf", seed=2).read_bytes()


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_model(tmp_path / "model.gguf", size="huge")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_f32_weights_and_f32_norms(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "f32.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert set(types.values()) == {gguf.GGMLQuantizationType.F32}
    f16 = gguf.GGUFReader(write_tiny_model(tmp_path / "f16.gguf"))
    for t in f16.tensors:
        expected = (
            gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.F16
        )
        assert t.tensor_type == expected, t.name


def test_quantizes_to_q4_k_m(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "test-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(
        str(model_path).encode(), str(out).encode(), ctypes.byref(params)
    )
    assert rc == 0
    assert out.stat().st_size < model_path.stat().st_size

    # Every width is a multiple of 256, so no tensor should fall back to a non-k quant.
    tensor_types = {t.tensor_type for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2}
    assert gguf.GGMLQuantizationType.Q4_K in tensor_types
    assert tensor_types <= {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}

    quantized = llama_cpp.Llama(model_path=str(out), n_ctx=512, n_threads=2, verbose=False)
    try:
        result = quantized.create_completion("Hello", max_tokens=4, temperature=0.0)
        assert not isinstance(result, Iterator)
        assert result["usage"]["completion_tokens"] == 4
    finally:
        quantized.close()


def test_demo_model_has_about_100m_parameters(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "demo.gguf", size="demo")
    n_params = sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    assert 80_000_000 <= n_params <= 130_000_000
    assert n_params == SIZES["demo"].n_params
