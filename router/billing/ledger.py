"""The router's durable store: API keys, budgets, the request ledger and the warnings fired.

SQLite in WAL mode in the router's `state_dir` (`ledger.sqlite`). Every answered or failed
request routed under a key or a budget is one ledger row, keyed by its request id (a retry of
the same write is a no-op, so nothing is counted twice). Rows are written by a thread of their
own in group commits (`submit`: the rows that arrive while one commit runs go into the next,
one transaction for all), and each answer is held until its row is committed. With
`synchronous=NORMAL` a committed row survives the router's crash (kill -9 included: WAL
frames are in the OS's page cache); a power cut may lose the last commits, which
`ledger_sync = "full"` prevents at the cost of an fsync per commit (shared by its rows).

Amounts are integers (`money.py`): nano-USD, millijoules and micrograms CO2e, in `INTEGER`
columns, so sums are exact and the same as the Redis store's. A ledger written before (`REAL`
dollars, kWh and kg; `PRAGMA user_version` 0) is converted when the router first opens it, in
one transaction, each amount rounded to the nearest unit.

Every row carries a link of a hash chain (`chain`: SHA-1 of the previous row's link and this
row's JSON, `chain_link`), and `meta.chain_head` the last link, written in the row's own
transaction: `wattops ledger verify` recomputes the chain and names the first row edited,
removed or inserted by hand (the Redis store keeps the same chain, computed by its script).
The chain shows what changed without the router; it is no defence against someone who also
rewrites every link after the change.

Reservations (what requests in flight may still cost) are not stored here: they live in the
router's memory (`admission.py`), so requests that died with a killed router hold nothing
when it starts again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from wattops.router.billing.budgets import Budget
from wattops.router.billing.keys import KeyRecord
from wattops.router.billing.money import Amounts

__all__ = ["GROUP_FIELDS", "Entry", "Ledger", "chain_link", "group_rows"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, team TEXT NOT NULL, name TEXT, created_at REAL NOT NULL,
    revoked_at REAL, rpm INTEGER, tpm INTEGER, salt TEXT NOT NULL, secret_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS budgets (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    request_id TEXT PRIMARY KEY, time REAL NOT NULL, key_id TEXT, team TEXT, route TEXT,
    served_by TEXT, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, energy_mj INTEGER NOT NULL,
    carbon_ug INTEGER NOT NULL, degraded TEXT, cache_hit INTEGER NOT NULL DEFAULT 0,
    list_cost_nusd INTEGER NOT NULL DEFAULT 0, reference_cost_nusd INTEGER, chain TEXT
);
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (time);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_totals (
    time REAL PRIMARY KEY, cost_nusd INTEGER NOT NULL, energy_mj INTEGER NOT NULL,
    carbon_ug INTEGER NOT NULL, parked_nusd INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS warnings (
    budget TEXT NOT NULL, window_start REAL NOT NULL, threshold REAL NOT NULL,
    fired_at REAL NOT NULL, spent REAL NOT NULL, limit_value REAL NOT NULL,
    PRIMARY KEY (budget, window_start, threshold)
);
"""

#: The ledger column each budget unit sums (in its integers: nano-USD, mJ, ugCO2e).
UNIT_COLUMNS = {"usd": "cost_nusd", "kwh": "energy_mj", "kgco2e": "carbon_ug"}
#: The schema's version (`PRAGMA user_version`): 1 since amounts are integers.
SCHEMA_VERSION = 1
#: From the REAL columns of version 0 to the INTEGER ones (each rounded to the nearest unit).
_TO_V1 = """
CREATE TABLE entries_v1 (
    request_id TEXT PRIMARY KEY, time REAL NOT NULL, key_id TEXT, team TEXT, route TEXT,
    served_by TEXT, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost_nusd INTEGER NOT NULL, energy_mj INTEGER NOT NULL,
    carbon_ug INTEGER NOT NULL, degraded TEXT, cache_hit INTEGER NOT NULL DEFAULT 0,
    list_cost_nusd INTEGER NOT NULL DEFAULT 0, reference_cost_nusd INTEGER, chain TEXT
);
INSERT INTO entries_v1 SELECT request_id, time, key_id, team, route, served_by, status,
    prompt_tokens, completion_tokens, CAST(ROUND(cost_usd * 1e9) AS INTEGER),
    CAST(ROUND(energy_kwh * 3.6e9) AS INTEGER), CAST(ROUND(carbon_kg * 1e9) AS INTEGER),
    degraded, cache_hit, CAST(ROUND(list_cost_usd * 1e9) AS INTEGER),
    CAST(ROUND(reference_cost_usd * 1e9) AS INTEGER), NULL FROM entries ORDER BY rowid;
DROP TABLE entries;
ALTER TABLE entries_v1 RENAME TO entries;
CREATE INDEX entries_by_time ON entries (time);
CREATE TABLE fleet_totals_v1 (
    time REAL PRIMARY KEY, cost_nusd INTEGER NOT NULL, energy_mj INTEGER NOT NULL,
    carbon_ug INTEGER NOT NULL, parked_nusd INTEGER NOT NULL DEFAULT 0
);
INSERT INTO fleet_totals_v1 SELECT time, CAST(ROUND(cost_usd * 1e9) AS INTEGER),
    CAST(ROUND(energy_kwh * 3.6e9) AS INTEGER), CAST(ROUND(carbon_kg * 1e9) AS INTEGER),
    CAST(ROUND(parked_usd * 1e9) AS INTEGER) FROM fleet_totals;
DROP TABLE fleet_totals;
ALTER TABLE fleet_totals_v1 RENAME TO fleet_totals;
"""
_SCOPE_COLUMNS = {"key": "key_id", "team": "team", "route": "route"}


@dataclass(frozen=True)
class Entry:
    """One request in the ledger; amounts in integers (nano-USD, mJ, ugCO2e)."""

    request_id: str
    time: float
    key_id: str | None
    team: str | None
    route: str | None
    served_by: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int
    energy_mj: int
    carbon_ug: int
    degraded: str | None = None
    cache_hit: bool = False
    #: The tokens at the server's rates, cache hit or not (a hit's saving is this).
    list_cost_nusd: int = 0
    #: The same tokens at the route's reference's rates (None: no route, or no price yet).
    reference_cost_nusd: int | None = None

    def json(self) -> bytes:
        """The row as the chain hashes it (and the Redis store keeps it)."""
        return orjson.dumps(dataclasses.asdict(self))

    def amount(self, unit: str) -> int:
        """What this row counts against a budget in `unit`."""
        if unit == "usd":
            return self.cost_nusd
        if unit == "kwh":
            return self.energy_mj
        return self.carbon_ug


class Ledger:
    """The SQLite store (one connection, used from the router's event loop)."""

    def __init__(self, path: Path, sync: str = "normal") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.sync = sync
        self.db = self._connect(path)
        #: Held by a commit of rows, and by the reads that must see commits whole.
        self._lock = threading.Lock()
        #: Commits of rows so far (each has a number: a row is in the sums read after it).
        self.committed = 0
        self._queue: queue.SimpleQueue[
            tuple[Entry, asyncio.Future[tuple[bool, int]], asyncio.AbstractEventLoop] | None
        ] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._migrate()
        self.db.executescript(_SCHEMA)
        self._keys = {k.id: k for k in self.key_records()}
        head = self.db.execute("SELECT value FROM meta WHERE name = 'chain_head'").fetchone()
        self._chain = head[0] if head else ""

    def _migrate(self) -> None:
        """Bring a ledger of an earlier schema to this one, in one transaction."""
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(entries)")}
        if version < 1 and "cost_usd" in columns:  # REAL dollars, kWh and kg
            for column, kind in (("list_cost_usd", "REAL NOT NULL DEFAULT 0"),
                                 ("reference_cost_usd", "REAL")):  # fmt: skip
                if column not in columns:  # written before reports existed
                    self.db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
            sampled = {row[1] for row in self.db.execute("PRAGMA table_info(fleet_totals)")}
            if sampled and "parked_usd" not in sampled:
                self.db.execute("ALTER TABLE fleet_totals ADD COLUMN parked_usd REAL NOT NULL "
                                "DEFAULT 0")  # fmt: skip
            if not sampled:
                self.db.execute("CREATE TABLE fleet_totals (time REAL PRIMARY KEY, cost_usd REAL, "
                                "energy_kwh REAL, carbon_kg REAL, parked_usd REAL)")  # fmt: skip
            self.db.executescript(f"BEGIN IMMEDIATE; {_TO_V1} PRAGMA user_version = "
                                  f"{SCHEMA_VERSION}; COMMIT;")  # fmt: skip
        elif version < SCHEMA_VERSION:
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(30)
            self._writer = None
        self.db.close()

    # -- keys ------------------------------------------------------------------------------

    def add_key(self, record: KeyRecord) -> None:
        self._keys[record.id] = record
        self.db.execute(
            "INSERT INTO keys (id, team, name, created_at, revoked_at, rpm, tpm, salt, "
            "secret_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.id, record.team, record.name, record.created_at, record.revoked_at,
             record.rpm, record.tpm, record.salt, record.secret_hash),
        )  # fmt: skip

    def key(self, key_id: str) -> KeyRecord | None:
        """The key's record (this router is the store's only writer: kept in memory)."""
        return self._keys.get(key_id)

    def has_keys(self) -> bool:
        return bool(self._keys)

    async def akey(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def ahas_keys(self) -> bool:
        return bool(self._keys)

    def key_records(self) -> list[KeyRecord]:
        rows = self.db.execute(
            "SELECT id, team, name, created_at, revoked_at, rpm, tpm, salt, secret_hash "
            "FROM keys ORDER BY created_at"
        ).fetchall()
        return [_key(row) for row in rows]

    def update_key(self, record: KeyRecord) -> None:
        self._keys[record.id] = record
        self.db.execute(
            "UPDATE keys SET name = ?, revoked_at = ?, rpm = ?, tpm = ? WHERE id = ?",
            (record.name, record.revoked_at, record.rpm, record.tpm, record.id),
        )

    # -- budgets ---------------------------------------------------------------------------

    def put_budget(self, budget: Budget) -> None:
        self.db.execute(
            "INSERT INTO budgets (name, body) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            (budget.name, budget.model_dump_json()),
        )

    def delete_budget(self, name: str) -> None:
        self.db.execute("DELETE FROM budgets WHERE name = ?", (name,))

    def budgets(self) -> list[Budget]:
        rows = self.db.execute("SELECT body FROM budgets ORDER BY name").fetchall()
        return [Budget.model_validate(json.loads(body)) for (body,) in rows]

    # -- the ledger ------------------------------------------------------------------------

    def record(self, entry: Entry) -> bool:
        """Write one request's row now, in its own transaction (tools and tests; the router
        writes through `submit`); False if that request id is already there."""
        return self.record_batch(entry)[0]

    def record_batch(self, entry: Entry) -> tuple[bool, int]:
        """As `record`, and the number of the commit that made it durable."""
        with self._lock:
            (new,) = self._insert(self.db, [entry])
            self.committed += 1
            return new, self.committed

    def _insert(self, db: sqlite3.Connection, entries: list[Entry]) -> list[bool]:
        """Insert `entries` in one transaction, each linked into the chain; whether each
        was new. Called with `_lock` held."""
        chain = self._chain
        out = []
        db.execute("BEGIN")
        try:
            for entry in entries:
                link = chain_link(chain, entry.json())
                cur = db.execute(
                    "INSERT OR IGNORE INTO entries (request_id, time, key_id, team, route, "
                    "served_by, status, prompt_tokens, completion_tokens, cost_nusd, "
                    "energy_mj, carbon_ug, degraded, cache_hit, list_cost_nusd, "
                    "reference_cost_nusd, chain) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (entry.request_id, entry.time, entry.key_id, entry.team, entry.route,
                     entry.served_by, entry.status, entry.prompt_tokens,
                     entry.completion_tokens, entry.cost_nusd, entry.energy_mj,
                     entry.carbon_ug, entry.degraded, int(entry.cache_hit),
                     entry.list_cost_nusd, entry.reference_cost_nusd, link),
                )  # fmt: skip
                new = cur.rowcount == 1
                if new:
                    chain = link
                out.append(new)
            if chain != self._chain:
                db.execute("INSERT INTO meta (name, value) VALUES ('chain_head', ?) "
                           "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                           (chain,))  # fmt: skip
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._chain = chain
        return out

    # -- the group commit ------------------------------------------------------------------

    def submit(self, entry: Entry) -> asyncio.Future[tuple[bool, int]]:
        """Queue `entry` for the writer thread's next commit (the router's path): a future
        of (new, the commit's number), set once the row is durable. Rows that arrive while a
        commit runs go into the next one together (a group commit: one transaction, and with
        `ledger_sync = "full"` one fsync, for all of them), so no row waits for more than the
        commit before its own, and the event loop never waits for the disk."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, int]] = loop.create_future()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="ledger-writer",
                                            daemon=True)  # fmt: skip
            self._writer.start()
        self._queue.put((entry, future, loop))
        return future

    def _write_loop(self) -> None:
        db = self._connect(self.path)
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            try:
                with self._lock:
                    results = self._insert(db, [entry for entry, _, _ in batch])
                    self.committed += 1
                    number = self.committed
            except Exception as exc:  # a full disk, a locked file: each waiting row fails
                for _, future, loop in batch:
                    loop.call_soon_threadsafe(_settle_future, future, None, exc)
                continue
            for (_, future, loop), new in zip(batch, results, strict=True):
                loop.call_soon_threadsafe(_settle_future, future, (new, number), None)
        db.close()

    def spent(self, budget: Budget, since: float, until: float | None = None) -> int:
        """What the ledger holds against `budget` from `since` (unix time) on (before
        `until`), in the unit's integers."""
        (total,) = self.db.execute(*self.spent_sql(budget, since, until)).fetchone()
        return int(total)

    def spent_committed(self, budget: Budget, since: float) -> tuple[int, int]:
        """`spent` from `since` on, and the number of the last commit it includes (a row of
        a later commit is not in it). Waits for a commit running now."""
        with self._lock:
            return self.spent(budget, since), self.committed

    @staticmethod
    def spent_sql(budget: Budget, since: float, until: float | None = None
                  ) -> tuple[str, list[float | str]]:  # fmt: skip
        """`spent`'s query and its parameters (`verify.py` runs it on its snapshot)."""
        column = UNIT_COLUMNS[budget.unit]
        where = "time >= ?"
        args: list[float | str] = [since]
        if budget.scope != "fleet" and budget.subject is not None:
            where += f" AND {_SCOPE_COLUMNS[budget.scope]} = ?"
            args.append(budget.subject)
        if until is not None:
            where += " AND time < ?"
            args.append(until)
        return f"SELECT COALESCE(SUM({column}), 0) FROM entries WHERE {where}", args

    def entries(self, since: float = 0.0) -> list[Entry]:
        rows = self.db.execute(
            "SELECT request_id, time, key_id, team, route, served_by, status, prompt_tokens, "
            "completion_tokens, cost_nusd, energy_mj, carbon_ug, degraded, cache_hit, "
            "list_cost_nusd, reference_cost_nusd FROM entries WHERE time >= ? ORDER BY time",
            (since,),
        ).fetchall()
        names = [f.name for f in dataclasses.fields(Entry)]
        found = [dict(zip(names, row, strict=True)) for row in rows]
        return [Entry(**{**row, "cache_hit": bool(row["cache_hit"])}) for row in found]

    # -- reports ---------------------------------------------------------------------------

    def groups(self, by: str, since: float, until: float) -> list[dict[str, float | str]]:
        """Per key, team or route (`by`), what the ledger holds between `since` and `until`:
        requests, tokens, cost, energy, carbon, cache hits and their saving, degraded answers,
        and the routing saving against the reference. Requests without one are `(none)`."""
        rows = self.db.execute(self.groups_sql(by), (since, until)).fetchall()
        return [dict(zip(GROUP_FIELDS, row, strict=True)) for row in rows]

    @staticmethod
    def groups_sql(by: str) -> str:
        """`groups`' query (parameters: since, until); `verify.py` runs it on its snapshot."""
        column = _SCOPE_COLUMNS[by]
        return (
            f"SELECT COALESCE({column}, '(none)') AS grp, COUNT(*), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nusd), SUM(energy_mj), "
            "SUM(carbon_ug), SUM(cache_hit), "
            "SUM(CASE WHEN cache_hit THEN list_cost_nusd ELSE 0 END), "
            "SUM(CASE WHEN degraded IS NOT NULL THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN NOT cache_hit AND reference_cost_nusd IS NOT NULL "
            "    THEN reference_cost_nusd - list_cost_nusd ELSE 0 END), "
            "SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END) "
            "FROM entries WHERE time >= ? AND time < ? GROUP BY grp "
            "ORDER BY SUM(cost_nusd) DESC, grp"
        )

    def sample_fleet(self, at: float, totals: Amounts, parked_nusd: int = 0) -> None:
        """Keep the fleet's cumulative attributed totals at `at` (the report's other side),
        and the hardware charges its deployments avoided while parked (nano-USD)."""
        self.db.execute(
            "INSERT OR REPLACE INTO fleet_totals (time, cost_nusd, energy_mj, carbon_ug, "
            "parked_nusd) VALUES (?, ?, ?, ?, ?)",
            (at, totals.nusd, totals.mj, totals.ug, parked_nusd),
        )

    def fleet_span(self, since: float, until: float) -> tuple[float, float, list[int]] | None:
        """(first sample time, last sample time, [nano-USD, mJ, ugCO2e, parked nano-USD]
        between them) of the fleet's totals within [since, until); None with fewer than two
        samples."""
        first = self.db.execute(
            "SELECT time, cost_nusd, energy_mj, carbon_ug, parked_nusd FROM fleet_totals "
            "WHERE time >= ? AND time < ? ORDER BY time LIMIT 1", (since, until),
        ).fetchone()  # fmt: skip
        last = self.db.execute(
            "SELECT time, cost_nusd, energy_mj, carbon_ug, parked_nusd FROM fleet_totals "
            "WHERE time >= ? AND time < ? ORDER BY time DESC LIMIT 1", (since, until),
        ).fetchone()  # fmt: skip
        if first is None or last is None or first[0] == last[0]:
            return None
        return first[0], last[0], [max(0, b - a) for a, b in zip(first[1:], last[1:],
                                                                  strict=True)]  # fmt: skip

    # -- warnings --------------------------------------------------------------------------

    def warn_once(self, budget: str, window_start: float, threshold: float, spent: float,
                  limit: float) -> bool:  # fmt: skip
        """Mark `threshold` of `budget` as fired in this window; False if it already was."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO warnings (budget, window_start, threshold, fired_at, spent, "
            "limit_value) VALUES (?, ?, ?, ?, ?, ?)",
            (budget, window_start, threshold, time.time(), spent, limit),
        )
        return cur.rowcount == 1

    async def awarn_once(self, budget: str, window_start: float, threshold: float,
                         spent: float, limit: float) -> bool:  # fmt: skip
        """`warn_once` (a local write, once per threshold and window)."""
        return self.warn_once(budget, window_start, threshold, spent, limit)

    def warnings(self, since: float = 0.0) -> list[dict[str, float | str]]:
        rows = self.db.execute(
            "SELECT budget, window_start, threshold, fired_at, spent, limit_value FROM warnings "
            "WHERE fired_at >= ? ORDER BY fired_at",
            (since,),
        ).fetchall()
        names = ("budget", "window_start", "threshold", "fired_at", "spent", "limit")
        return [dict(zip(names, row, strict=True)) for row in rows]


#: A report group's sums, in `Ledger.groups`' column order.
GROUP_FIELDS = ("group", "requests", "prompt_tokens", "completion_tokens", "cost_nusd",
                "energy_mj", "carbon_ug", "cache_hits", "cache_saving_nusd", "degraded",
                "routing_saving_nusd", "errors")  # fmt: skip


def group_rows(by: str, entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """`Ledger.groups`' sums over `entries`, in Python (for stores without SQL)."""
    column = _SCOPE_COLUMNS[by]
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        name = getattr(e, column) or "(none)"
        g = out.get(name)
        if g is None:
            g = out[name] = dict.fromkeys(GROUP_FIELDS, 0)
            g["group"] = name
        g["requests"] += 1
        g["prompt_tokens"] += e.prompt_tokens
        g["completion_tokens"] += e.completion_tokens
        g["cost_nusd"] += e.cost_nusd
        g["energy_mj"] += e.energy_mj
        g["carbon_ug"] += e.carbon_ug
        g["cache_hits"] += int(e.cache_hit)
        g["cache_saving_nusd"] += e.list_cost_nusd if e.cache_hit else 0
        g["degraded"] += int(e.degraded is not None)
        if not e.cache_hit and e.reference_cost_nusd is not None:
            g["routing_saving_nusd"] += e.reference_cost_nusd - e.list_cost_nusd
        g["errors"] += int(e.status >= 500)  # the fleet's failures, as the route counts them
    return sorted(out.values(), key=lambda g: (-g["cost_nusd"], g["group"]))


#: A row waiting for the writer: the row, its future, the loop that waits for it.
_Queued = tuple[Entry, "asyncio.Future[tuple[bool, int]]", asyncio.AbstractEventLoop]


def _settle_future(future: asyncio.Future[tuple[bool, int]], result: tuple[bool, int] | None,
                   error: Exception | None) -> None:  # fmt: skip
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def chain_link(previous: str, row: bytes) -> str:
    """The link of a row after `previous` in the ledger's hash chain (hex SHA-1, as Redis's
    `redis.sha1hex` computes it in the settle script)."""
    return hashlib.sha1(previous.encode() + row, usedforsecurity=False).hexdigest()


def _key(row: tuple[object, ...]) -> KeyRecord:
    names = ("id", "team", "name", "created_at", "revoked_at", "rpm", "tpm", "salt",
             "secret_hash")  # fmt: skip
    return KeyRecord.model_validate(dict(zip(names, row, strict=True)))
