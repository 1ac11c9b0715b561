"""The `llama-server` binary: built from the llama.cpp sources vendored in the pinned
llama-cpp-python sdist, and cached.

The agent's `llamacpp-server` engine runs llama.cpp's own HTTP server (parallel slots,
continuous batching, prefix caching, Prometheus metrics). Its source ships inside the
llama-cpp-python sdist the project already pins (`vendor/llama.cpp/tools/server`), so the
server and the Python bindings are the same llama.cpp. `build()` fetches that sdist with pip
(source only, no dependencies), configures it with CMake (portable: `-DGGML_NATIVE=OFF`, as
for the Python build; static, so the cache holds one self-contained file; no web UI, no TLS,
nothing fetched at build time) and builds the `llama-server` target alone.

The result is cached at `<cache>/llama-server/<version>-<flags hash>/llama-server`
(`vocabulary.cache_dir()`), so a fresh clone on a machine that built it once reuses it. A file
lock keeps two builds (two `make` runs, two test workers) from racing; the binary appears by
an atomic rename, so a killed build leaves nothing that looks finished.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from wattops.engines.base import EngineError
from wattops.vocabulary import cache_dir

PACKAGE = "llama-cpp-python"
#: Environment variable naming a llama-server binary to use instead of the cached build.
BINARY_ENV = "WATTOPS_LLAMA_SERVER"
#: CMake options of the build (the cache key hashes them with the version).
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


class ServerBuildError(EngineError):
    """llama-server could not be built or found; the message says what to install or run."""


def pinned_version() -> str:
    """The installed (pinned) llama-cpp-python version: the server is built from its sdist."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ServerBuildError(
            f"{PACKAGE} is not installed; install wattops first (`make install`)"
        ) from None


def cached_path(version: str | None = None) -> Path:
    """Where the build for `version` (default: the installed one) lives in the cache."""
    version = version or pinned_version()
    key = hashlib.sha256(" ".join(CMAKE_OPTIONS).encode()).hexdigest()[:10]
    return cache_dir() / "llama-server" / f"{version}-{key}" / "llama-server"


def find() -> Path:
    """The llama-server to run: `$WATTOPS_LLAMA_SERVER`, else the cached build.

    ServerBuildError says how to get one when neither exists. A `llama-server` merely on PATH is
    not picked up silently: it may be another llama.cpp than the one the bindings use; name it
    in the deployment's `server` setting to use it.
    """
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerBuildError(f"${BINARY_ENV}={explicit} is not an executable file")
        return path
    path = cached_path()
    if path.is_file():
        return path
    raise ServerBuildError(
        f"llama-server is not built yet (looked for {path}): run `make llama-server` or "
        "`python -m wattops.engines.server_binary`, or give a binary in the deployment's "
        f"`server` setting or ${BINARY_ENV}"
    )


def _require_tools() -> None:
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        raise ServerBuildError(
            f"building llama-server needs {', '.join(missing)} on PATH "
            "(Debian/Ubuntu: apt-get install cmake build-essential)"
        )


def _run(argv: list[str], log: Path, what: str) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise ServerBuildError(
            f"{what} failed (exit {done.returncode}); the last lines of {log}:\n" + "\n".join(tail)
        )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch_sdist(version: str, folder: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(folder), f"{PACKAGE}=={version}"],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise ServerBuildError(
            f"could not fetch the {PACKAGE}=={version} sdist from the package index: {reason}; "
            "llama-server is built from the llama.cpp it vendors (check the network or the "
            "pip index)"
        )
    return found[0]


def build(*, jobs: int | None = None, quiet: bool = False) -> Path:
    """Build llama-server for the installed llama-cpp-python unless it is cached; its path."""
    target = cached_path()
    if target.is_file():
        return target
    _require_tools()
    version = pinned_version()
    with _locked(target.parent):
        if target.is_file():  # another build finished while we waited for the lock
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
            work = Path(tmp)
            log = target.parent / "build.log"
            log.write_text("")
            if not quiet:
                print(f"llama-server: fetching the {PACKAGE}=={version} sdist", flush=True)
            sdist = _fetch_sdist(version, work)
            with tarfile.open(sdist) as archive:
                archive.extractall(work, filter="data")
            sources = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
            if sources is None or not (sources / "tools" / "server").is_dir():
                raise ServerBuildError(f"{sdist.name} holds no vendor/llama.cpp/tools/server")
            build_dir = work / "build"
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            if not quiet:
                print(f"llama-server: building (log: {log}; about 5 min on 2 cores)", flush=True)
            _run(
                ["cmake", "-S", str(sources), "-B", str(build_dir), *generator, *CMAKE_OPTIONS],
                log,
                "configuring llama-server (cmake)",
            )
            _run(
                ["cmake", "--build", str(build_dir), "--target", "llama-server",
                 "-j", str(jobs or os.cpu_count() or 2)],
                log,
                "building llama-server",
            )  # fmt: skip
            built = build_dir / "bin" / "llama-server"
            if not built.is_file():
                raise ServerBuildError(f"the build finished without {built}; see {log}")
            staged = target.parent / ".llama-server.partial"
            shutil.copy2(built, staged)
            os.replace(staged, target)
        if not quiet:
            print(f"llama-server: built in {time.monotonic() - started:.0f}s: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wattops.engines.server_binary",
        description="Build llama-server from the pinned llama-cpp-python sdist (cached).",
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    parser.add_argument("--quiet", action="store_true", help="print only the binary's path")
    parser.add_argument(
        "--print-path", action="store_true", help="print where the build goes and exit"
    )
    args = parser.parse_args(argv)
    if args.print_path:
        print(cached_path())
        return 0
    try:
        path = build(jobs=args.jobs, quiet=args.quiet)
    except ServerBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.quiet:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
