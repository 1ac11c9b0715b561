"""Write tiny random-weight llama GGUF models so tests and demos never download weights.

The files are real llama-architecture GGUF models: llama.cpp loads, runs, and quantizes them
like any converted checkpoint. The weights are random, so the text they generate is noise,
but the compute, memory, and tokenizer behaviour are those of a genuine model of that shape.

The tokenizer is SentencePiece-style (``tokenizer.ggml.model = "llama"``) with byte fallback:
every UTF-8 string round-trips, and a built-in list of common English pieces makes ordinary
text encode into noticeably fewer tokens than bytes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import numpy.typing as npt

__all__ = ["SIZES", "ModelSize", "TinyModelSpec", "write_tiny_model"]

ModelSize = Literal["test", "demo"]

# SentencePiece marks word starts with U+2581 instead of a space.
_SPACE = "\u2581"

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
_FIRST_BYTE_ID = 3
_N_SPECIAL = 3
_N_BYTES = 256

# Control tokens appended after the pieces (never between bytes and pieces, so byte b keeps id
# 3 + b). Having "<|im_end|>" in the vocabulary makes llama.cpp register it as an
# end-of-generation token, which is how real ChatML models stop at the end of a turn.
_CHAT_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Roughly frequency-ordered common English words; their order decides merge priority.
_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal
point mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story saw far sea draw left late run
while press close night real life few north open seem together next white children begin got
walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once
base hear horse cut sure watch color face wood main enough plain girl usual young ready above
ever red list though feel talk bird soon body dog family direct pose leave song measure door
product black short numeral class wind question happen complete ship area half rock order fire
south problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
field rest correct able pound done beauty drive stood contain front teach week final gave green
quick develop ocean warm free minute strong special mind behind clear tail produce fact street
inch multiply nothing course stay wheel full force blue object decide surface deep moon island
foot system busy test record boat common gold possible plane dry wonder laugh thousand ago ran
check game shape hot miss brought heat snow tire bring yes distant fill east paint language
among hello please thank thanks sorry today tomorrow yesterday question answer model token
energy cost price server request response data file code error value result lazy brown fox
jump jumps dog tiny small fast slow
"""

# Word-internal pieces; a word not in the list still splits into a few chunks, not letters.
_SUFFIXES = """
s es ed ing er ers est ly tion tions ment ments ness able ful less al ic ous ive ity y en
's n't 're 've 'll 'd
"""

# Capitalised forms cover sentence starts, the most common place a word is capitalised.
_N_CAPITALISED = 120

_PUNCTUATION_PIECES = ("...", "--", "?!", "!!", "://")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and tokenizer size of one tiny model."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    # Upper bound on the English pieces added after the byte tokens.
    max_pieces: int = 4096
    rope_freq_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_head_kv != 0:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_head_kv {self.n_head_kv}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_vocab(self) -> int:
        return len(_build_vocab(self.max_pieces)[0])

    @property
    def n_params(self) -> int:
        """Parameter count, embeddings and the untied output matrix included."""
        return sum(int(np.prod(shape)) for _, shape, _ in _tensor_plan(self))


# n_embd and n_ff are multiples of 256, the k-quant block size: llama.cpp quantizes a tensor to
# q4_K/q6_K only when its rows divide into whole blocks and otherwise falls back to another type
# for that tensor, which would make q4_k_m variants of these models unrepresentative.
SIZES: dict[str, TinyModelSpec] = {
    # A few MB: loads in milliseconds, so every test can afford a fresh file.
    "test": TinyModelSpec(
        name="wattops-tiny-test",
        n_embd=256,
        n_layer=2,
        n_head=4,
        n_head_kv=2,
        n_ff=512,
        n_ctx=2048,
    ),
    # About 100M parameters: large enough that decode is memory-bound on a CPU, so f16 and
    # 4-bit variants decode at clearly different speeds.
    "demo": TinyModelSpec(
        name="wattops-tiny-demo",
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_head_kv=12,
        n_ff=2560,
        n_ctx=2048,
    ),
}


def _ordered_unique(items: Iterator[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _with_prefixes(pieces: list[str]) -> Iterator[str]:
    # llama.cpp's SentencePiece tokenizer only builds a piece by merging two adjacent pieces that
    # are themselves in the vocabulary, so every prefix must exist for a whole word to be reached.
    # Prefixes come before the piece, so cutting the list anywhere keeps this property.
    for piece in pieces:
        for end in range(1, len(piece) + 1):
            yield piece[:end]


@cache
def _build_vocab(max_pieces: int) -> tuple[tuple[str, ...], tuple[float, ...], tuple[int, ...]]:
    """Return (tokens, scores, token types); identical for identical arguments."""
    words = _WORDS.split()
    capitalised = [w[:1].upper() + w[1:] for w in words[:_N_CAPITALISED]]
    printable = [chr(c) for c in range(0x21, 0x7F)]
    numbers = [str(n) for n in range(100)]
    candidates = (
        [_SPACE, *printable]
        + [_SPACE + w for w in [*words, *capitalised]]
        + [_SPACE + n for n in numbers]
        + _SUFFIXES.split()
        + list(_PUNCTUATION_PIECES)
    )
    pieces = _ordered_unique(_with_prefixes(candidates))[:max_pieces]

    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(_N_BYTES):
        tokens.append(f"<0x{byte:02X}>")
        scores.append(0.0)
        types.append(gguf.TokenType.BYTE)
    # Scores act as merge priorities (higher merges first), like SentencePiece log-probabilities.
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        scores.append(-float(rank))
        types.append(gguf.TokenType.NORMAL)
    for control in _CHAT_CONTROL_TOKENS:
        tokens.append(control)
        scores.append(0.0)
        types.append(gguf.TokenType.CONTROL)
    return tuple(tokens), tuple(scores), tuple(int(t) for t in types)


_Shape = tuple[int, ...]
_WeightKind = Literal["matrix", "norm"]


def _tensor_name(tensor: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[tensor]
    return (name.format(bid=bid) if bid is not None else name) + ".weight"


def _tensor_plan(spec: TinyModelSpec) -> list[tuple[str, _Shape, _WeightKind]]:
    """Tensors in file order, shapes in numpy (row-major, PyTorch-like) order."""
    t = gguf.MODEL_TENSOR
    n_vocab = spec.n_vocab
    q_dim = spec.n_head * spec.head_dim
    kv_dim = spec.n_head_kv * spec.head_dim
    plan: list[tuple[str, _Shape, _WeightKind]] = [
        (_tensor_name(t.TOKEN_EMBD), (n_vocab, spec.n_embd), "matrix"),
    ]
    for bid in range(spec.n_layer):
        plan += [
            (_tensor_name(t.ATTN_NORM, bid), (spec.n_embd,), "norm"),
            (_tensor_name(t.ATTN_Q, bid), (q_dim, spec.n_embd), "matrix"),
            (_tensor_name(t.ATTN_K, bid), (kv_dim, spec.n_embd), "matrix"),
            (_tensor_name(t.ATTN_V, bid), (kv_dim, spec.n_embd), "matrix"),
            (_tensor_name(t.ATTN_OUT, bid), (spec.n_embd, q_dim), "matrix"),
            (_tensor_name(t.FFN_NORM, bid), (spec.n_embd,), "norm"),
            (_tensor_name(t.FFN_GATE, bid), (spec.n_ff, spec.n_embd), "matrix"),
            (_tensor_name(t.FFN_UP, bid), (spec.n_ff, spec.n_embd), "matrix"),
            (_tensor_name(t.FFN_DOWN, bid), (spec.n_embd, spec.n_ff), "matrix"),
        ]
    plan += [
        (_tensor_name(t.OUTPUT_NORM), (spec.n_embd,), "norm"),
        (_tensor_name(t.OUTPUT), (n_vocab, spec.n_embd), "matrix"),
    ]
    return plan


def _add_metadata(
    writer: gguf.GGUFWriter, spec: TinyModelSpec, file_type: gguf.LlamaFileType
) -> None:
    tokens, scores, types = _build_vocab(spec.max_pieces)
    writer.add_name(spec.name)
    writer.add_description("Random weights for tests and demos; output is meaningless.")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(len(tokens))
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_freq_base)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)


def _random_weight(
    rng: np.random.Generator,
    shape: _Shape,
    kind: _WeightKind,
    std: float,
    dtype: npt.DTypeLike,
) -> npt.NDArray[np.generic]:
    if kind == "norm":
        # llama.cpp computes norms in f32 and quantizers skip 1-D tensors; keep them f32 as
        # converted checkpoints do.
        return np.ones(shape, dtype=np.float32)
    # Generating in f32 first makes the stream of random numbers independent of the dtype.
    weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return weight.astype(dtype)


def _silence_special_logits(weight: npt.NDArray[np.generic], n_vocab: int) -> None:
    # With random weights the argmax could land on </s> or a chat marker and end generation after
    # a token or two. A zero row gives those tokens logit 0, below the maximum of the other
    # random logits, so greedy decoding runs to max_tokens while sampling can still stop.
    n_controls = len(_CHAT_CONTROL_TOKENS)
    weight[:_N_SPECIAL] = 0
    weight[n_vocab - n_controls :] = 0


def write_tiny_model(
    path: Path,
    size: ModelSize = "test",
    seed: int = 0,
    dtype: Literal["f16", "f32"] = "f16",
) -> Path:
    """Write a random-weight llama GGUF model to ``path`` and return ``path``.

    The same ``size``, ``seed`` and ``dtype`` always produce a byte-identical file. The file
    appears atomically: readers see either the previous file or the complete new one.
    """
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; expected one of {sorted(SIZES)}")
    if dtype not in ("f16", "f32"):
        raise ValueError(f"unsupported dtype {dtype!r}; expected 'f16' or 'f32'")
    spec = SIZES[size]
    path = Path(path)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        _write_gguf(tmp_path, spec, seed, np_dtype, file_type)
        # mkstemp creates the file 0600; a model file is ordinary shared data.
        tmp_path.chmod(0o644)
        _fsync_path(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_gguf(
    out: Path,
    spec: TinyModelSpec,
    seed: int,
    np_dtype: type[np.floating],
    file_type: gguf.LlamaFileType,
) -> None:
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(out, arch)
    try:
        _add_metadata(writer, spec, file_type)
        plan = _tensor_plan(spec)
        # Declaring tensor infos up front and streaming the data keeps memory at one tensor,
        # instead of holding the whole ~200 MB demo model in RAM before writing.
        for name, shape, kind in plan:
            tensor_dtype = np.dtype(np.float32 if kind == "norm" else np_dtype)
            nbytes = int(np.prod(shape)) * tensor_dtype.itemsize
            writer.add_tensor_info(name, shape, tensor_dtype, nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        rng = np.random.default_rng(seed)
        output_name = _tensor_name(gguf.MODEL_TENSOR.OUTPUT)
        for name, shape, kind in plan:
            weight = _random_weight(rng, shape, kind, spec.init_std, np_dtype)
            if name == output_name:
                _silence_special_logits(weight, shape[0])
            writer.write_tensor_data(weight)
    finally:
        writer.close()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # Persists the rename itself; directories cannot be opened this way on every platform, and
    # the file is already complete, so a failure here is not worth surfacing.
    with contextlib.suppress(OSError):
        _fsync_path(directory)
