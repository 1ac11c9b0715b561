"""The gateway's response cache for deterministic requests: an in-memory LRU over SQLite.

Only requests with `temperature` 0 are cached: greedy decoding gives the same answer for the
same prompt on the same model and precision, so a stored answer is the answer the engine
would give. Keys cover the deployment, the precision that answered, the endpoint and the
normalised request body. The disk tier (diskcache, SQLite underneath) survives restarts and
evicts least-recently-stored entries beyond its byte cap; the memory tier evicts least-recently
used ones beyond its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cachetools import LRUCache

log = logging.getLogger("wattops.agent")

#: Request fields that do not change the answer's content.
_IGNORED_FIELDS = frozenset({"user", "metadata"})


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A stored upstream answer, replayed byte for byte."""

    content_type: str
    body: bytes

    def size(self) -> int:
        """Bytes charged against the cache's cap."""
        return len(self.body) + len(self.content_type) + 64


def is_cacheable(body: dict[str, Any]) -> bool:
    """True for deterministic requests: temperature explicitly 0 and a single choice."""
    temperature = body.get("temperature")
    return (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
        and body.get("n") in (None, 1)
    )


def cache_key(
    deployment: str, precision: str, endpoint: str, body: dict[str, Any], model: str = ""
) -> str:
    """A stable key for one request: key order and ignored fields do not matter.

    `model` identifies the weights (file, size, modification time): the disk tier outlives
    restarts, and a deployment pointed at another model must not replay the old answers.
    """
    relevant = {k: v for k, v in body.items() if k not in _IGNORED_FIELDS}
    relevant["stream"] = bool(relevant.get("stream"))
    canonical = orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(canonical + model.encode(), digest_size=16).hexdigest()
    return f"{deployment}|{precision}|{endpoint}|{digest}"


class ResponseCache:
    """Two tiers: memory (fast, bounded by bytes) and disk (bounded by bytes, persistent)."""

    def __init__(self, directory: Path | None, memory_bytes: int, disk_bytes: int) -> None:
        self.memory: LRUCache[str, CachedAnswer] | None = (
            LRUCache(maxsize=memory_bytes, getsizeof=CachedAnswer.size) if memory_bytes else None
        )
        self.disk: Any = None
        if directory is not None and disk_bytes > 0:
            import diskcache

            # The write-ahead log is SQLite's, outside diskcache's size accounting: it grew to
            # 25 MB for a 256 KiB cap when writes came from several threads at once (the fault
            # soak, docs/benchmarks.md), each connection's snapshot starving the checkpoints.
            # One writer thread, early checkpoints and a log truncated to an eighth of the cap
            # keep the folder within about 1.15 x disk_bytes.
            wal = max(64 * 1024, disk_bytes // 8)
            self.disk = diskcache.Cache(
                str(directory),
                size_limit=disk_bytes,
                eviction_policy="least-recently-stored",  # reads then never write to SQLite
                cull_limit=16,
                sqlite_journal_size_limit=wal,
                sqlite_wal_autocheckpoint=max(16, wal // 4096),
            )
        self._pending: set[asyncio.Future[None]] = set()
        #: One thread writes the disk tier: SQLite serialises writers anyway, and a single
        #: connection lets the write-ahead log be checkpointed and truncated.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-cache")

    def get(self, key: str) -> CachedAnswer | None:
        """The stored answer for `key`, promoting disk hits to memory."""
        if self.memory is not None:
            found = self.memory.get(key)
            if found is not None:
                return found
        if self.disk is None:
            return None
        raw = self.disk.get(key)
        if raw is None:
            return None
        answer = CachedAnswer(raw[0], raw[1])
        self._remember(key, answer)
        return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Store an answer; the disk write happens off the event loop."""
        self._remember(key, answer)
        if self.disk is not None:
            task = asyncio.get_running_loop().run_in_executor(
                self._writer, self._write_disk, key, answer
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _remember(self, key: str, answer: CachedAnswer) -> None:
        if self.memory is not None and answer.size() <= self.memory.maxsize:
            self.memory[key] = answer

    def _write_disk(self, key: str, answer: CachedAnswer) -> None:
        try:
            self.disk.set(key, (answer.content_type, answer.body))
        except Exception:  # a full or broken disk costs cache hits, never answers
            log.exception("response cache: disk write failed")

    async def close(self) -> None:
        """Finish pending disk writes and close the database."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._writer.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()
