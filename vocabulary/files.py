"""Durable files, the one way every layer writes what must survive a crash (state, ledgers,
results): a temporary file, fsync, rename, fsync of the folder."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never a mix,
    whatever moment the process dies at (kill -9 included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """Where wattops keeps what it can always rebuild (built variants, quality tables):
    `$WATTOPS_CACHE_DIR`, else `$XDG_CACHE_HOME/wattops`, else `~/.cache/wattops`."""
    explicit = os.environ.get("WATTOPS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wattops"
