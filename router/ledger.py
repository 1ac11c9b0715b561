"""The router's durable store: API keys, budgets, the request ledger and the warnings fired.

SQLite in WAL mode in the router's `state_dir` (`ledger.sqlite`). Every answered or failed
request routed under a key or a budget is one ledger row, keyed by its request id (a retry of
the same write is a no-op, so nothing is counted twice). Writes are committed before the answer
is returned; with `synchronous=NORMAL` a committed row survives the router's crash (kill -9
included: WAL frames are in the OS's page cache); a power cut may lose the last commits, which
`ledger_sync = "full"` prevents at the cost of an fsync per request.

Reservations (what requests in flight may still cost) are not stored here: they live in the
router's memory (`admission.py`), so requests that died with a killed router hold nothing
when it starts again.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattops.router.budgets import Budget
from wattops.router.keys import KeyRecord

__all__ = ["GROUP_FIELDS", "Entry", "Ledger", "group_rows"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, team TEXT NOT NULL, name TEXT, created_at REAL NOT NULL,
    revoked_at REAL, rpm INTEGER, tpm INTEGER, salt TEXT NOT NULL, secret_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS budgets (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    request_id TEXT PRIMARY KEY, time REAL NOT NULL, key_id TEXT, team TEXT, route TEXT,
    served_by TEXT, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, energy_kwh REAL NOT NULL,
    carbon_kg REAL NOT NULL, degraded TEXT, cache_hit INTEGER NOT NULL DEFAULT 0,
    list_cost_usd REAL NOT NULL DEFAULT 0, reference_cost_usd REAL
);
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (time);
CREATE TABLE IF NOT EXISTS fleet_totals (
    time REAL PRIMARY KEY, cost_usd REAL NOT NULL, energy_kwh REAL NOT NULL,
    carbon_kg REAL NOT NULL, parked_usd REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS warnings (
    budget TEXT NOT NULL, window_start REAL NOT NULL, threshold REAL NOT NULL,
    fired_at REAL NOT NULL, spent REAL NOT NULL, limit_value REAL NOT NULL,
    PRIMARY KEY (budget, window_start, threshold)
);
"""

#: The ledger column each budget unit sums.
UNIT_COLUMNS = {"usd": "cost_usd", "kwh": "energy_kwh", "kgco2e": "carbon_kg"}
_SCOPE_COLUMNS = {"key": "key_id", "team": "team", "route": "route"}


@dataclass(frozen=True)
class Entry:
    """One request in the ledger."""

    request_id: str
    time: float
    key_id: str | None
    team: str | None
    route: str | None
    served_by: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    energy_kwh: float
    carbon_kg: float
    degraded: str | None = None
    cache_hit: bool = False
    #: The tokens at the server's rates, cache hit or not (a hit's saving is this).
    list_cost_usd: float = 0.0
    #: The same tokens at the route's reference's rates (None: no route, or no price yet).
    reference_cost_usd: float | None = None

    def amount(self, unit: str) -> float:
        return float(getattr(self, UNIT_COLUMNS[unit]))


class Ledger:
    """The SQLite store (one connection, used from the router's event loop)."""

    def __init__(self, path: Path, sync: str = "normal") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(entries)")}
        for column, kind in (("list_cost_usd", "REAL NOT NULL DEFAULT 0"),
                             ("reference_cost_usd", "REAL")):  # fmt: skip
            if column not in columns:  # a ledger written before reports existed
                self.db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
        sampled = {row[1] for row in self.db.execute("PRAGMA table_info(fleet_totals)")}
        if "parked_usd" not in sampled:  # written before parking savings were sampled
            self.db.execute("ALTER TABLE fleet_totals ADD COLUMN parked_usd REAL NOT NULL "
                            "DEFAULT 0")  # fmt: skip
        self._keys = {k.id: k for k in self.key_records()}

    def close(self) -> None:
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
        """Write one request's row; False if that request id is already there."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO entries (request_id, time, key_id, team, route, served_by, "
            "status, prompt_tokens, completion_tokens, cost_usd, energy_kwh, carbon_kg, "
            "degraded, cache_hit, list_cost_usd, reference_cost_usd) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.request_id, entry.time, entry.key_id, entry.team, entry.route,
             entry.served_by, entry.status, entry.prompt_tokens, entry.completion_tokens,
             entry.cost_usd, entry.energy_kwh, entry.carbon_kg, entry.degraded,
             int(entry.cache_hit), entry.list_cost_usd, entry.reference_cost_usd),
        )  # fmt: skip
        return cur.rowcount == 1

    def spent(self, budget: Budget, since: float) -> float:
        """What the ledger holds against `budget` from `since` (unix time) on."""
        column = UNIT_COLUMNS[budget.unit]
        where = "time >= ?"
        args: list[float | str] = [since]
        if budget.scope != "fleet" and budget.subject is not None:
            where += f" AND {_SCOPE_COLUMNS[budget.scope]} = ?"
            args.append(budget.subject)
        (total,) = self.db.execute(
            f"SELECT COALESCE(SUM({column}), 0) FROM entries WHERE {where}", args
        ).fetchone()
        return float(total)

    def entries(self, since: float = 0.0) -> list[Entry]:
        rows = self.db.execute(
            "SELECT request_id, time, key_id, team, route, served_by, status, prompt_tokens, "
            "completion_tokens, cost_usd, energy_kwh, carbon_kg, degraded, cache_hit, "
            "list_cost_usd, reference_cost_usd FROM entries WHERE time >= ? ORDER BY time",
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
        column = {"key": "key_id", "team": "team", "route": "route"}[by]
        rows = self.db.execute(
            f"SELECT COALESCE({column}, '(none)') AS grp, COUNT(*), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd), SUM(energy_kwh), "
            "SUM(carbon_kg), SUM(cache_hit), "
            "SUM(CASE WHEN cache_hit THEN list_cost_usd ELSE 0 END), "
            "SUM(CASE WHEN degraded IS NOT NULL THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN NOT cache_hit AND reference_cost_usd IS NOT NULL "
            "    THEN reference_cost_usd - list_cost_usd ELSE 0 END), "
            "SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END) "
            f"FROM entries WHERE time >= ? AND time < ? GROUP BY grp ORDER BY SUM(cost_usd) DESC",
            (since, until),
        ).fetchall()
        return [dict(zip(GROUP_FIELDS, row, strict=True)) for row in rows]

    def sample_fleet(self, at: float, cost_usd: float, energy_kwh: float, carbon_kg: float,
                     parked_usd: float = 0.0) -> None:  # fmt: skip
        """Keep the fleet's cumulative attributed totals at `at` (the report's other side),
        and the hardware charges its deployments avoided while parked."""
        self.db.execute(
            "INSERT OR REPLACE INTO fleet_totals (time, cost_usd, energy_kwh, carbon_kg, "
            "parked_usd) VALUES (?, ?, ?, ?, ?)",
            (at, cost_usd, energy_kwh, carbon_kg, parked_usd),
        )

    def fleet_span(self, since: float, until: float) -> tuple[float, float, list[float]] | None:
        """(first sample time, last sample time, [cost, kWh, kgCO2e, parked $] between them)
        of the fleet's totals within [since, until); None with fewer than two samples."""
        first = self.db.execute(
            "SELECT time, cost_usd, energy_kwh, carbon_kg, parked_usd FROM fleet_totals "
            "WHERE time >= ? AND time < ? ORDER BY time LIMIT 1", (since, until),
        ).fetchone()  # fmt: skip
        last = self.db.execute(
            "SELECT time, cost_usd, energy_kwh, carbon_kg, parked_usd FROM fleet_totals "
            "WHERE time >= ? AND time < ? ORDER BY time DESC LIMIT 1", (since, until),
        ).fetchone()  # fmt: skip
        if first is None or last is None or first[0] == last[0]:
            return None
        return first[0], last[0], [max(0.0, b - a) for a, b in zip(first[1:], last[1:],
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

    def warnings(self, since: float = 0.0) -> list[dict[str, float | str]]:
        rows = self.db.execute(
            "SELECT budget, window_start, threshold, fired_at, spent, limit_value FROM warnings "
            "WHERE fired_at >= ? ORDER BY fired_at",
            (since,),
        ).fetchall()
        names = ("budget", "window_start", "threshold", "fired_at", "spent", "limit")
        return [dict(zip(names, row, strict=True)) for row in rows]


#: A report group's sums, in `Ledger.groups`' column order.
GROUP_FIELDS = ("group", "requests", "prompt_tokens", "completion_tokens", "cost_usd",
                "energy_kwh", "carbon_kg", "cache_hits", "cache_saving_usd", "degraded",
                "routing_saving_usd", "errors")  # fmt: skip


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
        g["cost_usd"] += e.cost_usd
        g["energy_kwh"] += e.energy_kwh
        g["carbon_kg"] += e.carbon_kg
        g["cache_hits"] += int(e.cache_hit)
        g["cache_saving_usd"] += e.list_cost_usd if e.cache_hit else 0.0
        g["degraded"] += int(e.degraded is not None)
        if not e.cache_hit and e.reference_cost_usd is not None:
            g["routing_saving_usd"] += e.reference_cost_usd - e.list_cost_usd
        g["errors"] += int(e.status >= 500)  # the fleet's failures, as the route counts them
    return sorted(out.values(), key=lambda g: -g["cost_usd"])


def _key(row: tuple[object, ...]) -> KeyRecord:
    names = ("id", "team", "name", "created_at", "revoked_at", "rpm", "tpm", "salt",
             "secret_hash")  # fmt: skip
    return KeyRecord.model_validate(dict(zip(names, row, strict=True)))
