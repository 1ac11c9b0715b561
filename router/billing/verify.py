"""`wattops ledger verify`: the ledger re-added, row by row, and compared with what the router
counts and reports.

Checked, on either store:

- **the hash chain** (`ledger.py`): every row's link recomputed from the one before and the
  row's JSON, and the last link against the head the store keeps; a row edited, removed or
  inserted by hand breaks it at that row (rows written before the chain existed have no link
  and are counted apart);
- **each budget's spend per window**: the rows it covers re-added, in the unit's integers,
  against the store's counter for that window (Redis: every `spent:` counter still kept; a
  running SQLite router: the windows it holds in memory; a SQLite ledger at rest: the SQL sum
  the router starts from, for every window with rows, the last `MAX_WINDOWS` per budget);
- **reservations**: what each budget holds reserved against the sum of what the requests in
  flight hold (Redis: every router's; a running SQLite router: its own);
- **the report** (SQLite): the SQL sums per key, team and route against the same rows re-added.

Each store is read as one snapshot: SQLite in one read transaction (WAL: the router keeps
writing), Redis with one script that returns every counter, reservation and the stream's last
id at once, the rows then read up to that id. A running SQLite router's memory is read on
its event loop (no await between its settles' row and counter), with the last row id then.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from wattops.router.api import Budget, LedgerCheck
from wattops.router.billing.budgets import window_end, window_start
from wattops.router.billing.ledger import GROUP_FIELDS, Entry, Ledger, chain_link, group_rows
from wattops.router.billing.money import show
from wattops.router.billing.redis_ledger import RedisLedger, entry_of

__all__ = ["MAX_WINDOWS", "Live", "verify_at", "verify_redis", "verify_sqlite"]

#: Windows per budget a SQLite ledger at rest is checked for (the most recent).
MAX_WINDOWS = 1000
_ENTRY_COLUMNS = ("request_id, time, key_id, team, route, served_by, status, prompt_tokens, "
                  "completion_tokens, cost_nusd, energy_mj, carbon_ug, degraded, cache_hit, "
                  "list_cost_nusd, reference_cost_nusd")  # fmt: skip


@dataclass
class Live:
    """A running SQLite router's figures, read on its event loop: the last row id they
    include, each budget's window (start, end) and spend, and its reservations against what
    its requests in flight hold."""

    last_rowid: int
    windows: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)


@dataclass
class _Findings:
    store: str
    mismatches: list[str] = field(default_factory=list)
    rows: int = 0
    chained: int = 0
    windows: int = 0
    budgets: int = 0

    def result(self) -> LedgerCheck:
        return LedgerCheck(store=self.store, rows=self.rows, chained_rows=self.chained,
                           budgets_checked=self.budgets, windows_checked=self.windows,
                           mismatches=self.mismatches, ok=not self.mismatches)  # fmt: skip


def _moment(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _chain(found: _Findings, rows: Iterable[tuple[Entry, bytes, str | None]],
           head: str | None) -> list[Entry]:  # fmt: skip
    """Check the hash chain over `rows` (in the order written); the rows as entries."""
    out: list[Entry] = []
    previous = ""
    started = False
    seen: set[str] = set()
    for entry, raw, link in rows:
        out.append(entry)
        if entry.request_id in seen:
            found.mismatches.append(f"request {entry.request_id} has two rows")
        seen.add(entry.request_id)
        if link is None:
            if started:
                found.mismatches.append(
                    f"row {entry.request_id} ({_moment(entry.time)}) has no chain link after "
                    "rows that have one: inserted without the router"
                )
            continue
        started = True
        found.chained += 1
        if chain_link(previous, raw) != link:
            found.mismatches.append(
                f"row {entry.request_id} ({_moment(entry.time)}): the hash chain breaks here: "
                "this row was edited, or a row before it removed or inserted"
            )
        previous = link
    found.rows = len(out)
    if started and head is not None and head != previous:
        found.mismatches.append(
            "the chain's head is not the last row's link: rows after "
            f"{out[-1].request_id if out else 'the start'} were removed"
        )
    return out


def _readd(budget: Budget, entries: Iterable[Entry], start: float, end: float) -> int:
    return sum(e.amount(budget.unit) for e in entries
               if start <= e.time < end and budget.covers(e.key_id, e.team, e.route))  # fmt: skip


def _window(budget: Budget, at: float) -> tuple[float, float]:
    moment = datetime.fromtimestamp(at, UTC)
    return (window_start(budget.window, moment).timestamp(),
            window_end(budget.window, moment).timestamp())  # fmt: skip


def _spend(found: _Findings, budget: Budget, start: float, counted: int, readded: int,
           what: str) -> None:  # fmt: skip
    found.windows += 1
    if counted != readded:
        found.mismatches.append(
            f"budget {budget.name}, window from {_moment(start)}: {what} holds "
            f"{show(counted, budget.unit)}, its rows add up to {show(readded, budget.unit)}"
        )


def _reservations(found: _Findings, reserved: Mapping[str, int], held: Mapping[str, int],
                  units: Mapping[str, str]) -> None:  # fmt: skip
    for name in sorted(set(reserved) | set(held)):
        if reserved.get(name, 0) != held.get(name, 0):
            unit = units.get(name, "usd")
            found.mismatches.append(
                f"budget {name}: {show(reserved.get(name, 0), unit)} reserved, the requests in "
                f"flight hold {show(held.get(name, 0), unit)}"
            )


def verify_sqlite(path: Path, live: Live | None = None) -> LedgerCheck:
    """Check a SQLite ledger (see the module docstring); `live`: a running router's figures."""
    found = _Findings(str(path))
    if not path.exists():
        found.mismatches.append(f"{path}: no such ledger")
        return found.result()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("BEGIN")  # one snapshot for every read below
        (integrity,) = db.execute("PRAGMA quick_check").fetchone()
        if integrity != "ok":
            found.mismatches.append(f"{path}: SQLite's quick_check says {integrity}")
        budgets = [Budget.model_validate_json(body) for (body,) in
                   db.execute("SELECT body FROM budgets ORDER BY name")]  # fmt: skip
        head = db.execute("SELECT value FROM meta WHERE name = 'chain_head'").fetchone()
        names = _ENTRY_COLUMNS.split(", ")
        rows = []
        for row in db.execute(f"SELECT rowid, {_ENTRY_COLUMNS}, chain FROM entries ORDER BY rowid"):
            values = dict(zip(names, row[1:-1], strict=True))
            entry = Entry(**{**values, "cache_hit": bool(values["cache_hit"])})
            rows.append((row[0], entry, row[-1]))
        entries = _chain(found, ((e, e.json(), link) for _, e, link in rows),
                         head[0] if head else None)  # fmt: skip
        found.budgets = len(budgets)
        if live is not None:
            upto = [e for rowid, e, _ in rows if rowid <= live.last_rowid]
            for b in budgets:
                if b.name in live.windows:
                    start, end, spent = live.windows[b.name]
                    _spend(found, b, start, spent, _readd(b, upto, start, end), "the router")
            _reservations(found, live.reserved, live.held, {b.name: b.unit for b in budgets})
        else:
            for b in budgets:
                covered = [e for e in entries if b.covers(e.key_id, e.team, e.route)]
                starts = sorted({_window(b, e.time) for e in covered})[-MAX_WINDOWS:]
                for start, end in starts:
                    (summed,) = db.execute(*Ledger.spent_sql(b, start, end)).fetchone()
                    _spend(found, b, start, int(summed), _readd(b, entries, start, end),
                           "the SQL sum the router starts from")  # fmt: skip
        _report(found, db, entries)
        db.execute("COMMIT")
    finally:
        db.close()
    return found.result()


def _report(found: _Findings, db: sqlite3.Connection, entries: list[Entry]) -> None:
    """The report's SQL sums per key, team and route against the rows re-added."""
    for by in ("key", "team", "route"):
        sql = Ledger.groups_sql(by)
        got = {row[0]: dict(zip(GROUP_FIELDS, row, strict=True))
               for row in db.execute(sql, (float("-inf"), float("inf")))}  # fmt: skip
        want = {g["group"]: g for g in group_rows(by, entries)}
        for name in sorted(set(got) | set(want)):
            a, b = got.get(name), want.get(name)
            if a is None or b is None:
                found.mismatches.append(f"report by {by}: group {name} is only in "
                                        f"{'the rows' if a is None else 'the report'}")  # fmt: skip
                continue
            differ = [f for f in GROUP_FIELDS[1:] if int(a[f] or 0) != int(b[f] or 0)]
            if differ:
                found.mismatches.append(
                    f"report by {by}, group {name}: "
                    + ", ".join(f"{f} {a[f]} in the report, {b[f]} re-added" for f in differ)
                )


# ARGV: prefix, then the counter names. Returns the stream's last id, the chain's head, the
# counters' values, and every budget's reservation and every router's holdings.
_SNAPSHOT = """
local P = ARGV[1]
local last = redis.call('XREVRANGE', P .. 'entries', '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
local counters = {}
for i = 2, #ARGV do counters[#counters + 1] = redis.call('GET', ARGV[i]) or '0' end
local reserved = {}
for _, name in ipairs(redis.call('HKEYS', P .. 'budgets')) do
  reserved[#reserved + 1] = {name, redis.call('GET', P .. 'reserved:' .. name) or '0'}
end
local held = {}
for _, r in ipairs(redis.call('ZRANGE', P .. 'routers', 0, -1)) do
  for _, v in ipairs(redis.call('HVALS', P .. 'inflight:' .. r)) do held[#held + 1] = v end
end
return {last_id, redis.call('GET', P .. 'chain') or '', counters, reserved, held}
"""


def verify_redis(ledger: RedisLedger) -> LedgerCheck:
    """Check a Redis store (see the module docstring)."""
    db, p = ledger.db, ledger.prefix
    found = _Findings(ledger.url)
    budgets = {b.name: b for b in ledger.budgets()}
    found.budgets = len(budgets)
    counters = [k.decode() for k in db.scan_iter(match=f"{p}spent:*", count=1000)]
    last_id, head, values, reserved, held = db.eval(_SNAPSHOT, 0, p, *counters)
    rows = []
    for _, fields in _stream(db, f"{p}entries", last_id.decode()):
        raw = fields[b"e"]
        link = fields.get(b"h")
        rows.append((entry_of(orjson.loads(raw)), raw, link.decode() if link else None))
    entries = _chain(found, rows, head.decode() or None)
    by_budget: dict[str, list[Entry]] = defaultdict(list)
    for name, b in budgets.items():
        by_budget[name] = [e for e in entries if b.covers(e.key_id, e.team, e.route)]
    for key, value in zip(counters, values, strict=True):
        name, _, start_text = key.removeprefix(f"{p}spent:").rpartition(":")
        budget = budgets.get(name)
        if budget is None:
            continue  # a deleted budget's counter, left to expire
        start, end = _window(budget, float(start_text))
        _spend(found, budget, start, int(value), _readd(budget, by_budget[name], start, end),
               "its Redis counter")  # fmt: skip
    holdings: dict[str, int] = defaultdict(int)
    for raw in held:
        for name, amount in orjson.loads(raw).items():
            holdings[name] += int(amount)
    _reservations(found, {n.decode(): int(v) for n, v in reserved}, holdings,
                  {n: b.unit for n, b in budgets.items()})  # fmt: skip
    return found.result()


def _stream(db: Any, key: str, last_id: str) -> Iterable[tuple[bytes, dict[bytes, bytes]]]:
    low = "-"
    while last_id != "0-0":
        page = db.xrange(key, low, last_id, count=5000)
        yield from page
        if len(page) < 5000:
            return
        low = "(" + page[-1][0].decode()


def verify_at(state_dir: Path | None = None, store: str | None = None,
              prefix: str = "wattops:") -> LedgerCheck:  # fmt: skip
    """A ledger at rest: `state_dir`'s ledger.sqlite, or the Redis store at `store`."""
    if store is not None:
        return verify_redis(RedisLedger(store, prefix))
    assert state_dir is not None
    return verify_sqlite(state_dir / "ledger.sqlite")
