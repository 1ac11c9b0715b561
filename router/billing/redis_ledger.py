"""The router's store in Redis, shared by several routers behind a load balancer.

`store = "redis://host:6379/0"` in `[router]` puts what `ledger.py` keeps in SQLite into one
Redis database, so every router sees the same keys, budgets and ledger: a key revoked through
one router is refused by the others from their next request (keys are read from Redis on every
request, never cached), and a budget's spend is one counter that every router's requests add
to. Budget admission (check, reserve, settle, release) runs as atomic Lua scripts
(`shared_book.py`).

Layout (every name under the prefix, `wattops:` by default):

- `keys` hash: key id -> the key's record as JSON (salted hash included, never the secret);
- `budgets` hash: name -> the budget as JSON; `bidx:fleet`, `bidx:<scope>:<subject>` sets:
  which budgets cover a key, a team, a route (so the scripts find them without a scan);
- `entries` stream: the ledger, one entry per request (field `e`: the row as JSON, field
  `h`: its link of the ledger's hash chain, as `ledger.py`'s; `chain`: the last link); a row's
  id is its time in milliseconds, or the previous row's if a router's clock is behind (ids
  only grow), so rows from a time on start at that id; `seen:<request id>`: a marker kept
  8 days, so a row written twice is counted once;
- `spent:<budget>:<window start>`: what the budget's window has spent (kept 8 days past it);
  `reserved:<budget>`: what requests in flight have reserved; `limits` hash: budget -> its
  limit; all integers of the budget's unit (`money.py`: nano-USD, mJ, ugCO2e), added with
  `INCRBY`, so the sums are exact and the SQLite store's; `inflight:<router id>` hash:
  request id -> what it reserved on which budget; `routers` sorted set: router id -> its last
  heartbeat (Redis's clock);
- `schema`: the layout's version (1: integer amounts). A store written before (float amounts,
  no `schema`) is converted when a router first opens it: stop every router, upgrade them,
  start them (one converts; amounts are rounded to the nearest unit, reservations recounted
  from the requests in flight; ledger rows are read in either form);
- `warned` hash: one field per (budget, window, threshold) that fired; `fleet` sorted set: the
  fleet's attributed totals over time (each router samples them).

Durability is Redis's: run it with `appendonly yes` (`appendfsync everysec` loses at most a
second of rows on a power cut; `always` nothing). The scripts name keys they compute, so this
needs one Redis 7 or later (or a replicated primary), not Redis Cluster.

A request's steps (key, check and reserve, settle, release) and the heartbeat go through
redis.asyncio (`adb`): a round trip never holds the router's event loop, so other requests
and streams go on while it is out (tests/test_router_budgets.py proves it with asyncio's
debug mode, every Redis reply held 0.4 s by a proxy). Control calls (keys and budgets made
or changed, reports, `wattops ledger verify`) use the synchronous client (`db`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis
import redis.asyncio

from wattops.router.billing.budgets import Budget
from wattops.router.billing.keys import KeyRecord
from wattops.router.billing.ledger import Entry, group_rows
from wattops.router.billing.money import UNIT_SCALE, Amounts

__all__ = ["RedisLedger", "budget_index"]

#: The layout's version (the `schema` key).
SCHEMA_VERSION = 1
#: Row fields before amounts were integers -> (field now, its scale).
_LEGACY_FIELDS = {"cost_usd": ("cost_nusd", UNIT_SCALE["usd"]),
                  "energy_kwh": ("energy_mj", UNIT_SCALE["kwh"]),
                  "carbon_kg": ("carbon_ug", UNIT_SCALE["kgco2e"]),
                  "list_cost_usd": ("list_cost_nusd", UNIT_SCALE["usd"]),
                  "reference_cost_usd": ("reference_cost_nusd", UNIT_SCALE["usd"])}  # fmt: skip
#: How far routers' clocks may differ when the ledger is read by time.
_CLOCK_MARGIN_S = 3600.0
_PAGE = 5000


def budget_index(prefix: str, budget: Budget) -> str:
    """The set that lists `budget` among those covering its key, team, route or the fleet."""
    if budget.scope == "fleet" or budget.subject is None:
        return f"{prefix}bidx:fleet"
    return f"{prefix}bidx:{budget.scope}:{budget.subject}"


def entry_of(row: dict[str, Any]) -> Entry:
    """A ledger row from its JSON, written with integer amounts or (before) float ones."""
    for old, (new, scale) in _LEGACY_FIELDS.items():
        if old in row:
            value = row.pop(old)
            row[new] = None if value is None else round(value * scale)
    return Entry(**{k: v for k, v in row.items() if k in _ENTRY_FIELDS})


_ENTRY_FIELDS = {f.name for f in dataclasses.fields(Entry)}


def _key_json(record: KeyRecord) -> bytes:
    return orjson.dumps({**record.model_dump(), "salt": record.salt,
                         "secret_hash": record.secret_hash})  # fmt: skip


class RedisLedger:
    """Keys, budgets, the ledger, warnings and fleet samples in one Redis database."""

    def __init__(self, url: str, prefix: str = "wattops:") -> None:
        self.url = url
        self.prefix = prefix
        # Any: redis-py types every reply as a union with its asyncio client's awaitables.
        self.db: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                            health_check_interval=30)  # fmt: skip
        #: The router's hot path (keys, check, reserve, settle, release, heartbeat): the
        #: asyncio client, so a round trip never holds the event loop. The control calls
        #: (keys and budgets made or changed, reports) use `db`.
        self.adb: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )
        self._has_keys = False
        try:
            self.db.ping()
            self._migrate()
        except redis.RedisError as exc:
            raise ConnectionError(f"store {url}: cannot reach Redis: {exc}") from None

    def _migrate(self) -> None:
        """Float amounts (a store written before `schema` 1) to integers; see the module
        docstring. Run with every router stopped."""
        if self.db.get(self._k("schema")) is not None:
            return
        budgets = {b.name: b for b in self.budgets()}
        pipe = self.db.pipeline(transaction=True)
        for name, budget in budgets.items():
            scale = UNIT_SCALE[budget.unit]
            pipe.hset(self._k("limits"), name, budget.limit_units)
            for key in self.db.scan_iter(match=f"{self.prefix}spent:{name}:*", count=1000):
                raw = self.db.get(key)
                if raw is not None:
                    pipe.set(key, round(float(raw) * scale), keepttl=True)
        reserved: dict[str, int] = dict.fromkeys(budgets, 0)
        for key in self.db.scan_iter(match=f"{self.prefix}inflight:*", count=1000):
            for rid, raw in self.db.hgetall(key).items():
                held = {}
                for name, amount in orjson.loads(raw).items():
                    unit = budgets[name].unit if name in budgets else "usd"
                    held[name] = str(round(float(amount) * UNIT_SCALE[unit]))
                    reserved[name] = reserved.get(name, 0) + int(held[name])
                pipe.hset(key, rid, orjson.dumps(held))
        for name, amount in reserved.items():
            pipe.set(self._k(f"reserved:{name}"), amount)
        for member in self.db.zrange(self._k("fleet"), 0, -1):
            at, *values = orjson.loads(member)
            if any(isinstance(v, float) for v in values):
                scales = (UNIT_SCALE["usd"], UNIT_SCALE["kwh"], UNIT_SCALE["kgco2e"],
                          UNIT_SCALE["usd"])  # fmt: skip
                pipe.zrem(self._k("fleet"), member)
                pipe.zadd(
                    self._k("fleet"),
                    {
                        orjson.dumps(
                            [at, *(round(v * k) for v, k in zip(values, scales, strict=False))]
                        ): at
                    },
                )
        pipe.set(self._k("schema"), SCHEMA_VERSION)
        pipe.execute()

    def close(self) -> None:
        self.db.close()

    async def aclose(self) -> None:
        await self.adb.aclose()

    def _k(self, name: str) -> str:
        return self.prefix + name

    # -- keys ------------------------------------------------------------------------------

    def add_key(self, record: KeyRecord) -> None:
        self.db.hset(self._k("keys"), record.id, _key_json(record))
        self._has_keys = True

    def key(self, key_id: str) -> KeyRecord | None:
        """The key's record, read from Redis now (a revocation by another router counts)."""
        raw = self.db.hget(self._k("keys"), key_id)
        return KeyRecord.model_validate_json(raw) if raw else None

    async def akey(self, key_id: str) -> KeyRecord | None:
        """`key`, on the asyncio client."""
        raw = await self.adb.hget(self._k("keys"), key_id)
        return KeyRecord.model_validate_json(raw) if raw else None

    async def ahas_keys(self) -> bool:
        if not self._has_keys:
            self._has_keys = bool(await self.adb.hlen(self._k("keys")))
        return self._has_keys

    async def abudgets(self) -> dict[str, Budget]:
        found = [
            Budget.model_validate_json(raw) for raw in await self.adb.hvals(self._k("budgets"))
        ]
        return {b.name: b for b in sorted(found, key=lambda b: b.name)}

    def has_keys(self) -> bool:
        # Keys are revoked, never deleted: once one exists, it always will.
        if not self._has_keys:
            self._has_keys = bool(self.db.hlen(self._k("keys")))
        return self._has_keys

    def key_records(self) -> list[KeyRecord]:
        found = [KeyRecord.model_validate_json(raw)
                 for raw in self.db.hvals(self._k("keys"))]  # fmt: skip
        return sorted(found, key=lambda k: k.created_at)

    def update_key(self, record: KeyRecord) -> None:
        self.db.hset(self._k("keys"), record.id, _key_json(record))

    # -- budgets (written by the book's scripts, which keep the index sets) ----------------

    def budgets(self) -> list[Budget]:
        found = [Budget.model_validate_json(raw) for raw in self.db.hvals(self._k("budgets"))]
        return sorted(found, key=lambda b: b.name)

    # -- the ledger ------------------------------------------------------------------------

    def _scan(self, since: float, until: float | None = None,
              last_id: str | None = None) -> Iterator[Entry]:  # fmt: skip
        """The rows with since <= time (< until), read by pages of the stream."""
        # A row's id is never below its time (ms), and above it only by how far another
        # router's clock was ahead: start at `since`, stop a margin past `until`.
        low = str(max(0, int(since * 1000)))
        high = last_id or ("+" if until is None else str(int((until + _CLOCK_MARGIN_S) * 1000)))
        while True:
            page = self.db.xrange(self._k("entries"), low, high, count=_PAGE)
            for _, fields in page:
                entry = entry_of(orjson.loads(fields[b"e"]))
                if entry.time >= since and (until is None or entry.time < until):
                    yield entry
            if len(page) < _PAGE:
                return
            low = "(" + page[-1][0].decode()

    def spent(self, budget: Budget, since: float, until: float | None = None,
              last_id: str | None = None) -> int:  # fmt: skip
        """What the ledger holds against `budget` from `since` on (before `until`, up to
        stream id `last_id`), in the unit's integers."""
        return sum(e.amount(budget.unit) for e in self._scan(since, until, last_id=last_id)
                   if budget.covers(e.key_id, e.team, e.route))  # fmt: skip

    def entries(self, since: float = 0.0) -> list[Entry]:
        return sorted(self._scan(since), key=lambda e: e.time)

    def groups(self, by: str, since: float, until: float) -> list[dict[str, Any]]:
        """As `Ledger.groups` (the same sums as its SQL, summed here)."""
        return group_rows(by, self._scan(since, until))

    def sample_fleet(self, at: float, totals: Amounts, parked_nusd: int = 0) -> None:
        member = orjson.dumps([at, totals.nusd, totals.mj, totals.ug, parked_nusd])
        self.db.zadd(self._k("fleet"), {member: at})

    def fleet_span(self, since: float, until: float) -> tuple[float, float, list[int]] | None:
        """As `Ledger.fleet_span`."""
        key = self._k("fleet")
        first = self.db.zrangebyscore(key, since, f"({until}", start=0, num=1)
        last = self.db.zrevrangebyscore(key, f"({until}", since, start=0, num=1)
        if not first or not last:
            return None
        a, b = orjson.loads(first[0]), orjson.loads(last[0])
        if a[0] == b[0]:
            return None
        return a[0], b[0], [max(0, y - x) for x, y in zip(a[1:], b[1:], strict=True)]

    # -- warnings --------------------------------------------------------------------------

    def warn_once(self, budget: str, window_start: float, threshold: float, spent: float,
                  limit: float) -> bool:  # fmt: skip
        """Mark `threshold` of `budget` as fired in this window; False if any router had."""
        field, row = self._warning(budget, window_start, threshold, spent, limit)
        return bool(self.db.hsetnx(self._k("warned"), field, row))

    async def awarn_once(self, budget: str, window_start: float, threshold: float,
                         spent: float, limit: float) -> bool:  # fmt: skip
        """`warn_once`, on the asyncio client."""
        field, row = self._warning(budget, window_start, threshold, spent, limit)
        return bool(await self.adb.hsetnx(self._k("warned"), field, row))

    def _warning(self, budget: str, window_start: float, threshold: float, spent: float,
                 limit: float) -> tuple[str, bytes]:  # fmt: skip
        field = f"{budget}|{window_start!r}|{threshold!r}"
        row = {"budget": budget, "window_start": window_start, "threshold": threshold,
               "fired_at": time.time(), "spent": spent, "limit": limit}  # fmt: skip
        return field, orjson.dumps(row)

    def warnings(self, since: float = 0.0) -> list[dict[str, Any]]:
        rows = [orjson.loads(raw) for raw in self.db.hvals(self._k("warned"))]
        return sorted((r for r in rows if r["fired_at"] >= since), key=lambda r: r["fired_at"])
