"""Model variants: a deployment's base GGUF quantized to other precisions, built on demand.

Variants are built with llama.cpp's own quantizer in a child process (a crash in native code
must not take the agent down), written to a temporary file, checked, and renamed into place,
so a half-written or corrupt file is never served.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from wattops.engines.base import EngineError
from wattops.vocabulary import BASE_PRECISIONS, PRECISIONS

# gguf's LlamaFileType member names for the precisions whose name differs from the pattern.
_FILE_TYPE_NAMES = {"f32": "ALL_F32"}


class CorruptModelError(EngineError):
    """A GGUF file is truncated or not a GGUF file at all."""


def _file_type_name(precision: str) -> str:
    return _FILE_TYPE_NAMES.get(precision, "MOSTLY_" + precision.upper())


def check_gguf(path: Path) -> int:
    """Check that `path` is a complete GGUF file; returns its general.file_type.

    Raises CorruptModelError naming the file if the header cannot be parsed or a tensor's
    data would lie past the end of the file (a truncated write).
    """
    import gguf  # imported here: reading the module costs ~0.2 s and few callers need it

    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CorruptModelError(f"{path}: cannot read the model file: {exc.strerror}") from None
    if head != b"GGUF":
        raise CorruptModelError(
            f"{path}: not a GGUF file (it begins with {head!r}; a GGUF file begins with "
            "b'GGUF'): give a llama.cpp model file"
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError...
        raise CorruptModelError(f"{path}: not a readable GGUF file ({exc})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CorruptModelError(f"{path}: truncated (tensor {tensor.name} runs past the end)")
    field = reader.fields.get("general.file_type")
    if field is None:
        return int(gguf.LlamaFileType.MOSTLY_F16)
    return int(field.parts[field.data[0]][0])


def precision_of(path: Path) -> str:
    """The precision name of a GGUF file, from its general.file_type."""
    import gguf

    value = check_gguf(path)
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        raise EngineError(f"{path}: unknown llama.cpp file type {value}") from None
    for precision in PRECISIONS:
        if _file_type_name(precision) == name:
            return precision
    raise EngineError(f"{path}: file type {name} is not one wattops serves")


def quantizable_from(base: str) -> list[str]:
    """Precisions that can be built from a base of precision `base`, best first."""
    if base not in BASE_PRECISIONS:
        return [base]
    return [base] + [p for p in PRECISIONS if p not in BASE_PRECISIONS]


def quantize(source: Path, target: Path, precision: str, threads: int = 0) -> None:
    """Quantize `source` into `target` at `precision`, atomically (blocking).

    Raises EngineError for an unknown precision or when llama.cpp's quantizer fails.
    """
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    import llama_cpp

    ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + _file_type_name(precision), None)
    if ftype is None:
        raise EngineError(f"this llama.cpp build cannot produce {precision}")
    check_gguf(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    try:
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0 or not tmp.exists():
            raise EngineError(f"llama.cpp could not quantize {source} to {precision} (code {rc})")
        check_gguf(tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_identity(path: Path) -> str:
    """A key that changes when the model file does (its path, size and modification time):
    what variants and quality tables built from it are filed under. OSError if unreadable."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return key.hexdigest()[:16]


class VariantStore:
    """The agent's cache of built variants under `<state_dir>/variants`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[Path, asyncio.Lock] = {}

    def path_for(self, base: Path, precision: str) -> Path:
        """Where the `precision` variant of `base` lives; keyed by the base's identity."""
        return self.root / model_identity(base) / f"{base.stem}.{precision}.gguf"

    async def ensure(self, base: Path, precision: str, threads: int = 0) -> Path:
        """The variant's path, building it first (in a child process) if it is missing."""
        try:
            target = self.path_for(base, precision)
        except OSError as exc:
            raise EngineError(f"base model {base}: {exc.strerror}") from None
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            if target.exists():
                try:
                    await asyncio.to_thread(check_gguf, target)
                    return target
                except CorruptModelError:
                    target.unlink(missing_ok=True)  # rebuilt below
            proc = await asyncio.create_subprocess_exec(
                *build_argv(base, target, precision, threads),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await proc.communicate()
            if proc.returncode != 0:
                raise build_failure(base, precision, output, proc.returncode)
            return target


def build_argv(base: Path, target: Path, precision: str, threads: int) -> list[str]:
    """The child process that builds a variant: llama.cpp's loader log stays in its output."""
    return [sys.executable, "-m", "wattops.engines.variants", str(base), str(target), precision,
            "--threads", str(threads)]  # fmt: skip


def build_failure(base: Path, precision: str, output: bytes, code: int | None) -> EngineError:
    """Why a build failed: our own `error:` line if the child wrote one, else the log's tail."""
    lines = output.decode("utf-8", "replace").strip().splitlines()
    ours = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    reason = ours[-1] if ours else ("\n".join(lines[-3:]) or f"exit code {code}")
    return EngineError(f"building {precision} from {base.name} failed: {reason}")


def quantize_quietly(source: Path, target: Path, precision: str, threads: int = 0) -> None:
    """`quantize` in a child process, its llama.cpp log kept out of the terminal (it is over a
    hundred lines); EngineError with the reason when it fails."""
    done = subprocess.run(build_argv(source, target, precision, threads), capture_output=True,
                          stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    if done.returncode != 0:
        raise build_failure(source, precision, done.stdout + done.stderr, done.returncode)


def main(argv: list[str] | None = None) -> int:
    """`python -m wattops.engines.variants BASE TARGET PRECISION`: the agent's build step."""
    parser = argparse.ArgumentParser(prog="wattops.engines.variants")
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("precision", choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        quantize(args.source, args.target, args.precision, args.threads)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
