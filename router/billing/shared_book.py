"""Budgets shared by several routers: admission as atomic Lua scripts on Redis.

The same rules as `admission.py` (over at `spent + reserved >= limit`, a request reserves its
worst case on every budget that covers it, settling replaces the reservation by the cost),
with the state in Redis (`redis_ledger.py` has the layout) instead of one router's memory:

- **check** (`LOOK`): the standings of the budgets that cover a key, team and route, found
  through the index sets, in one round trip;
- **reserve** (`RESERVE`): refuses if one of them is over, otherwise adds the request's worst
  case to each one's `reserved` and notes it under the router's id, in one script: Redis runs
  scripts one at a time, so two routers cannot both pass a budget's last unit;
- **settle** (`SETTLE`): releases the reservation, writes the ledger row (once per request
  id), adds its cost to each covering budget's window, and returns the new standings (for the
  warnings);
- **release** (`RELEASE`): a request that failed gives its reservation back.

A router that dies leaves reservations under its id. Every router beats its heart into
`routers` (Redis's clock) every few seconds and, when it does, releases the reservations of
routers silent for `STALE_S`, and its own that no request of it holds any more (a settle or
release that failed while Redis was unreachable); a router releases its own id's
reservations when it starts (its id is kept in its state dir, so a restart finds them at
once).

Budget windows are computed by the router (calendar months are easier in Python) and passed
to the scripts as the current hour's, day's and month's start and end. The router's clock rules
windows; Redis's clock only counts durations: a spend counter's TTL is set relative (`EXPIRE`,
the window's end less the router's now, plus `KEEP_S`), never as an absolute time that Redis
would read on its own clock, and the heartbeat's staleness is measured on Redis's `TIME` alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from wattops.router.billing.admission import (
    Admission,
    Amounts,
    BudgetExceeded,
    BudgetWarning,
    Standing,
    due,
    fire,
    ring,
    verdict,
)
from wattops.router.billing.budgets import Budget, window_end, window_start
from wattops.router.billing.ledger import Entry
from wattops.router.billing.money import from_units
from wattops.router.billing.redis_ledger import RedisLedger, budget_index

__all__ = ["STALE_S", "SharedBudgetBook"]

log = logging.getLogger("wattops.router")

#: A router silent this long is taken for dead: its reservations are released.
STALE_S = 30.0
#: How long a settled request id is remembered (a retry of its write is not counted twice).
SEEN_S = 8 * 86400
#: How long a window's spend counter outlives the window.
KEEP_S = 8 * 86400

_HEAD = """
if redis.replicate_commands then redis.replicate_commands() end
local P = ARGV[1]
local function fmt(x) return string.format('%.0f', x) end
"""

_RELEASE_FN = """
local function release(router, rid)
  local key = P .. 'inflight:' .. router
  local held = redis.call('HGET', key, rid)
  if not held then return 0 end
  for name, amount in pairs(cjson.decode(held)) do
    redis.call('DECRBY', P .. 'reserved:' .. name, amount)
  end
  redis.call('HDEL', key, rid)
  return 1
end
"""

# ARGV[2..4]: key id, team, route ('' for none); ARGV[5..10]: the hour's, day's and month's
# start and end (unix seconds).
_PRELUDE = (
    _HEAD
    + _RELEASE_FN
    + """
local function covering(key_id, team, route)
  local sets = {P .. 'bidx:fleet'}
  if key_id ~= '' then sets[#sets + 1] = P .. 'bidx:key:' .. key_id end
  if team ~= '' then sets[#sets + 1] = P .. 'bidx:team:' .. team end
  if route ~= '' then sets[#sets + 1] = P .. 'bidx:route:' .. route end
  return redis.call('SUNION', unpack(sets))
end
local W = {hour = {ARGV[5], ARGV[6]}, day = {ARGV[7], ARGV[8]}, month = {ARGV[9], ARGV[10]}}
local function stand(name)
  local body = redis.call('HGET', P .. 'budgets', name)
  if not body then return nil end
  local b = cjson.decode(body)
  local win = W[b.window]
  local spent = tonumber(redis.call('GET', P .. 'spent:' .. name .. ':' .. win[1]) or '0')
  local reserved = tonumber(redis.call('GET', P .. 'reserved:' .. name) or '0')
  local limit = tonumber(redis.call('HGET', P .. 'limits', name))
  return {b = b, body = body, spent = spent, reserved = reserved, limit = limit,
          start = win[1], stop = win[2]}
end
local function row(name, s) return {name, s.body, fmt(s.spent), fmt(s.reserved)} end
"""
)

# ARGV: prefix, key id, team, route, windows (6).
_LOOK = (
    _PRELUDE
    + """
local out = {}
for _, name in ipairs(covering(ARGV[2], ARGV[3], ARGV[4])) do
  local s = stand(name)
  if s then out[#out + 1] = row(name, s) end
end
return out
"""
)

# ARGV: ..., router id, request id, usd, kwh, kgco2e.
_RESERVE = (
    _PRELUDE
    + """
local found, degrading = {}, {}
for _, name in ipairs(covering(ARGV[2], ARGV[3], ARGV[4])) do
  local s = stand(name)
  if s then
    if s.spent + s.reserved >= s.limit then return {'over', row(name, s)} end
    found[#found + 1] = {name, s}
    -- The first budget past its degrade threshold (as admission.py's `verdict`): the
    -- request goes to a cheaper candidate; found in the same round trip as the reservation.
    if #degrading == 0 and s.b.degrade_at ~= nil and s.b.degrade_at ~= cjson.null
        and s.spent + s.reserved >= tonumber(s.b.degrade_at) * s.limit then
      degrading = row(name, s)
    end
  end
end
local worst = {usd = ARGV[13], kwh = ARGV[14], kgco2e = ARGV[15]}
local held, names = {}, {}
for _, x in ipairs(found) do
  local amount = worst[x[2].b.unit]
  redis.call('INCRBY', P .. 'reserved:' .. x[1], amount)
  held[x[1]] = amount
  names[#names + 1] = x[1]
end
if #names > 0 then
  redis.call('HSET', P .. 'inflight:' .. ARGV[11], ARGV[12], cjson.encode(held))
end
return {'ok', names, degrading}
"""
)

# ARGV: prefix, router id, request id.
_RELEASE = (
    _HEAD
    + _RELEASE_FN
    + """
return release(ARGV[2], ARGV[3])
"""
)

# ARGV: ..., router id, the admission's request id ('' if none), the row's request id, time,
# usd, kwh, kgco2e, the row as JSON, seen s, keep s, the router's now.
_SETTLE = (
    _PRELUDE
    + """
-- How long to keep the spend counter of a window that ends at `stop`: seconds from the
-- router's now (at least 1), plus how long a counter outlives its window.
local function keep(stop)
  return math.max(1, math.ceil(tonumber(stop) - tonumber(ARGV[21]))) + tonumber(ARGV[20])
end
release(ARGV[11], ARGV[12])
if not redis.call('SET', P .. 'seen:' .. ARGV[13], '1', 'NX', 'EX', ARGV[19]) then
  return {'dup', {}}
end
local t = tonumber(ARGV[14])
-- The row's id is its time in ms (or the last row's, if that is later: ids only grow), so
-- the ledger is read by time from its id on, whichever router wrote it.
local ms = math.floor(t * 1000)
local last = redis.call('XREVRANGE', P .. 'entries', '+', '-', 'COUNT', 1)
if #last > 0 then
  local last_ms = tonumber(string.match(last[1][1], '^(%d+)'))
  if last_ms > ms then ms = last_ms end
end
-- The ledger's hash chain (ledger.py's `chain_link`): this row's link hashes the last one's.
local link = redis.sha1hex((redis.call('GET', P .. 'chain') or '') .. ARGV[18])
redis.call('XADD', P .. 'entries', string.format('%.0f', ms) .. '-*', 'e', ARGV[18], 'h', link)
redis.call('SET', P .. 'chain', link)
local cost = {usd = ARGV[15], kwh = ARGV[16], kgco2e = ARGV[17]}
local out = {}
for _, name in ipairs(covering(ARGV[2], ARGV[3], ARGV[4])) do
  local s = stand(name)
  if s then
    if t >= tonumber(s.start) then
      local key = P .. 'spent:' .. name .. ':' .. s.start
      s.spent = tonumber(redis.call('INCRBY', key, cost[s.b.unit]))
      -- A TTL from the router's own now, not EXPIREAT: Redis would apply an end of window
      -- reckoned on the router's clock against its own, and a clock behind Redis's would
      -- see its counters deleted as they are written (README: Budgets, "Which clock rules").
      redis.call('EXPIRE', key, keep(s.stop))
    end
    out[#out + 1] = row(name, s)
  end
end
return {'ok', out}
"""
)

# ARGV: prefix, name, body (or '' to delete), its index set, its window's spend counter, its
# limit in its unit's integers. Returns the ledger stream's last id: rows up to it are counted
# by the caller, rows after it by their own settle (the budget is in its index from here on).
_PUT = """
local P = ARGV[1]
local old = redis.call('HGET', P .. 'budgets', ARGV[2])
if old then
  local o = cjson.decode(old)
  local idx = P .. 'bidx:fleet'
  if o.scope ~= 'fleet' and o.subject ~= cjson.null then
    idx = P .. 'bidx:' .. o.scope .. ':' .. o.subject
  end
  redis.call('SREM', idx, ARGV[2])
end
if ARGV[3] == '' then
  redis.call('HDEL', P .. 'budgets', ARGV[2])
  redis.call('HDEL', P .. 'limits', ARGV[2])
  return '0-0'
end
redis.call('HSET', P .. 'budgets', ARGV[2], ARGV[3])
redis.call('HSET', P .. 'limits', ARGV[2], ARGV[6])
redis.call('SADD', ARGV[4], ARGV[2])
redis.call('DEL', ARGV[5])
local last = redis.call('XREVRANGE', P .. 'entries', '+', '-', 'COUNT', 1)
if #last > 0 then return last[1][1] end
return '0-0'
"""

# ARGV: prefix, this router's id, stale after s, '1' to release all of this id's own
# reservations, then the request ids this router still has in flight: its other reservations
# (a settle or release that could not reach Redis) are released too.
_HEARTBEAT = (
    _HEAD
    + _RELEASE_FN
    + """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', P .. 'routers', now, ARGV[2])
local dead = redis.call('ZRANGEBYSCORE', P .. 'routers', '-inf', now - tonumber(ARGV[3]))
if ARGV[4] == '1' then dead[#dead + 1] = ARGV[2] end
local freed = 0
if ARGV[4] ~= '1' then
  local live = {}
  for i = 5, #ARGV do live[ARGV[i]] = true end
  for _, rid in ipairs(redis.call('HKEYS', P .. 'inflight:' .. ARGV[2])) do
    if not live[rid] then freed = freed + release(ARGV[2], rid) end
  end
end
for _, r in ipairs(dead) do
  for _, rid in ipairs(redis.call('HKEYS', P .. 'inflight:' .. r)) do
    freed = freed + release(r, rid)
  end
  if r ~= ARGV[2] then redis.call('ZREM', P .. 'routers', r) end
end
return freed
"""
)


_WINDOWS = ("hour", "day", "month")


def _windows(now: float) -> list[float]:
    """The start and end of the hour, the day and the month that contain `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    out = []
    for window in _WINDOWS:
        out += [window_start(window, moment).timestamp(), window_end(window, moment).timestamp()]
    return out


@dataclass
class SharedBudgetBook:
    """`BudgetBook`'s interface over Redis, for routers that share budgets."""

    ledger: RedisLedger
    router_id: str
    clock: Callable[[], float] = time.time
    on_warning: Callable[[BudgetWarning], None] | None = None
    #: A router silent this long is taken for dead (its heartbeat comes every 5 s).
    stale_s: float = STALE_S
    in_flight: dict[str, Admission] = field(default_factory=dict)
    warnings: deque[BudgetWarning] = field(default_factory=lambda: deque(maxlen=200))
    _fired: set[tuple[str, float, float]] = field(default_factory=set)
    #: The current hour's windows (computed once an hour, not with datetime per request).
    _now_windows: tuple[list[float], list[str]] = field(default_factory=lambda: ([0.0, 0.0], []))

    def __post_init__(self) -> None:
        db = self.ledger.db
        self._look = db.register_script(_LOOK)
        self._reserve = db.register_script(_RESERVE)
        self._release = db.register_script(_RELEASE)
        self._settle = db.register_script(_SETTLE)
        self._put = db.register_script(_PUT)
        self._beat = db.register_script(_HEARTBEAT)
        adb = self.ledger.adb  # the same scripts on the asyncio client (the hot path's)
        self._a_look = adb.register_script(_LOOK)
        self._a_reserve = adb.register_script(_RESERVE)
        self._a_release = adb.register_script(_RELEASE)
        self._a_settle = adb.register_script(_SETTLE)
        self._a_beat = adb.register_script(_HEARTBEAT)
        freed = self.heartbeat(own=True)
        if freed:
            log.warning("released %d reservations left by an earlier run of router %s",
                        freed, self.router_id)  # fmt: skip

    @property
    def prefix(self) -> str:
        return self.ledger.prefix

    def heartbeat(self, own: bool = False) -> int:
        """Say this router is alive; release the reservations of routers that are not (and,
        with `own`, this id's from before a restart). Returns how many were released."""
        args = [self.prefix, self.router_id, self.stale_s, "1" if own else "0", *self.in_flight]
        return self._beaten(int(self._beat(args=args)), own)

    def _beaten(self, freed: int, own: bool) -> int:
        if freed and not own:
            log.warning("released %d reservations of requests no longer in flight (routers "
                        "silent for %.0f s, or settles that could not reach Redis)", freed,
                        self.stale_s)  # fmt: skip
        return freed

    # -- budgets ---------------------------------------------------------------------------

    @property
    def budgets(self) -> Mapping[str, Budget]:
        return {b.name: b for b in self.ledger.budgets()}

    def put(self, budget: Budget) -> None:
        """Create or replace a budget; its current window's spend is recounted from the
        ledger (rows up to now here, rows after by their own settle: none twice)."""
        now = self.clock()
        moment = datetime.fromtimestamp(now, UTC)
        start = window_start(budget.window, moment).timestamp()
        end = window_end(budget.window, moment).timestamp()
        counter = f"{self.prefix}spent:{budget.name}:{int(start)}"
        last = self._put(args=[self.prefix, budget.name, budget.model_dump_json(),
                               budget_index(self.prefix, budget), counter,
                               budget.limit_units])  # fmt: skip
        last_id = last.decode() if isinstance(last, bytes) else str(last)
        if last_id != "0-0":
            spent = self.ledger.spent(budget, start, last_id=last_id)
            if spent:
                self.ledger.db.incrby(counter, spent)
        # A TTL from this router's now (not EXPIREAT, which Redis reads on its own clock).
        self.ledger.db.expire(counter, max(1, math.ceil(end - now)) + KEEP_S)

    def delete(self, name: str) -> None:
        self._put(args=[self.prefix, name, "", "", "", ""])

    def may_cover(self, key_id: str | None, team: str | None, route: str | None) -> bool:
        return True  # the scripts find out, in the round trip they make anyway

    def _windows(self, now: float) -> tuple[list[float], list[str]]:
        times, _ = self._now_windows
        if not times[0] <= now < times[1]:  # a new hour (days and months start on one)
            times = _windows(now)
            self._now_windows = (times, [str(int(t)) for t in times])
        return self._now_windows

    def _args(self, key_id: str | None, team: str | None, route: str | None,
              now: float) -> list[Any]:  # fmt: skip
        return [self.prefix, key_id or "", team or "", route or "", *self._windows(now)[1]]

    def _standing(self, row: list[bytes], now: float) -> Standing:
        budget = Budget.model_validate_json(row[1])
        times = self._windows(now)[0]
        at = 2 * _WINDOWS.index(budget.window)
        return Standing(budget, times[at], times[at + 1], int(row[2]), int(row[3]))

    def standing(self, budget: Budget, now: float | None = None) -> Standing:
        now = self.clock() if now is None else now
        moment = datetime.fromtimestamp(now, UTC)
        start = window_start(budget.window, moment).timestamp()
        spent, reserved = self.ledger.db.mget(
            f"{self.prefix}spent:{budget.name}:{int(start)}", f"{self.prefix}reserved:{budget.name}"
        )
        return Standing(budget, start, window_end(budget.window, moment).timestamp(),
                        int(spent or 0), int(reserved or 0))  # fmt: skip

    def standings(self) -> Iterable[Standing]:
        now = self.clock()
        return [self.standing(b, now) for b in self.budgets.values()]

    # -- admission -------------------------------------------------------------------------

    def check(self, key_id: str | None, team: str | None, route: str | None
              ) -> tuple[Standing | None, Standing | None]:  # fmt: skip
        now = self.clock()
        rows = self._look(args=self._args(key_id, team, route, now))
        return verdict(self._standing(row, now) for row in rows)

    def admit(self, request_id: str, key_id: str | None, team: str | None, route: str | None,
              worst: Amounts, degraded_by: Budget | None = None) -> Admission:  # fmt: skip
        now = self.clock()
        args = self._admit_args(request_id, key_id, team, route, worst, now)
        return self._admitted(self._reserve(args=args), request_id, key_id, team, route, worst,
                              now, degraded_by)  # fmt: skip

    def _admit_args(self, request_id: str, key_id: str | None, team: str | None,
                    route: str | None, worst: Amounts, now: float) -> list[Any]:  # fmt: skip
        return [*self._args(key_id, team, route, now), self.router_id, request_id, worst.nusd,
                worst.mj, worst.ug]  # fmt: skip

    def _admitted(self, reply: list[Any], request_id: str, key_id: str | None, team: str | None,
                  route: str | None, worst: Amounts, now: float,
                  degraded_by: Budget | None = None) -> Admission:  # fmt: skip
        verdict, found, *degrading = reply
        if verdict == b"over":
            raise BudgetExceeded(self._standing(found, now), now)
        names = [n.decode() for n in found]
        admission = Admission(request_id, key_id, team, route, worst, names, degraded_by)
        if degrading and degrading[0]:
            admission.degrading = self._standing(degrading[0], now)
        if names:
            self.in_flight[request_id] = admission
        else:
            admission.done = True  # nothing reserved, nothing to give back
        return admission

    def release(self, admission: Admission) -> None:
        if admission.done:
            return
        self._settled(admission)
        self._release(args=[self.prefix, self.router_id, admission.request_id])

    def settle(self, admission: Admission | None, entry: Entry) -> None:
        now = self.clock()
        try:
            verdict, rows = self._settle(args=self._settle_args(admission, entry, now))
        finally:
            self._settled(admission)
        if verdict == b"dup":
            return
        for row in rows:
            ring(self, self._standing(row, now))

    def _settle_args(self, admission: Admission | None, entry: Entry, now: float) -> list[Any]:
        held = admission.request_id if admission is not None and not admission.done else ""
        return [*self._args(entry.key_id, entry.team, entry.route, now), self.router_id, held,
                entry.request_id, repr(entry.time), entry.cost_nusd, entry.energy_mj,
                entry.carbon_ug, entry.json(), SEEN_S, KEEP_S, repr(now)]  # fmt: skip

    def _settled(self, admission: Admission | None) -> None:
        """The admission is over here (its reservation is the script's to give back)."""
        if admission is not None:
            admission.done = True
            self.in_flight.pop(admission.request_id, None)

    # -- the router's calls: redis.asyncio, the same scripts, nothing blocks the event loop ---

    async def acheck(self, key_id: str | None, team: str | None, route: str | None
                     ) -> tuple[Standing | None, Standing | None]:  # fmt: skip
        now = self.clock()
        rows = await self._a_look(args=self._args(key_id, team, route, now))
        return verdict(self._standing(row, now) for row in rows)

    async def aadmit(self, request_id: str, key_id: str | None, team: str | None,
                     route: str | None, worst: Amounts) -> Admission:  # fmt: skip
        now = self.clock()
        reply = await self._a_reserve(
            args=self._admit_args(request_id, key_id, team, route, worst, now)
        )
        return self._admitted(reply, request_id, key_id, team, route, worst, now)

    async def arelease(self, admission: Admission) -> None:
        if admission.done:
            return
        self._settled(admission)
        await self._a_release(args=[self.prefix, self.router_id, admission.request_id])

    async def asettle(self, admission: Admission | None, entry: Entry) -> None:
        now = self.clock()
        try:
            verdict, rows = await self._a_settle(args=self._settle_args(admission, entry, now))
        finally:
            self._settled(admission)
        if verdict == b"dup":
            return
        for row in rows:
            s = self._standing(row, now)
            b = s.budget
            for threshold in due(self, s):
                spent = from_units(s.spent, b.unit)
                if await self.ledger.awarn_once(b.name, s.window_start, threshold, spent, b.limit):
                    fire(self, s, threshold)

    async def aheartbeat(self) -> int:
        args = [self.prefix, self.router_id, self.stale_s, "0", *self.in_flight]
        return self._beaten(int(await self._a_beat(args=args)), own=False)

    async def astandings(self) -> Iterable[Standing]:
        now = self.clock()
        budgets = list((await self.ledger.abudgets()).values())
        names = []
        moment = datetime.fromtimestamp(now, UTC)
        for b in budgets:
            start = window_start(b.window, moment).timestamp()
            names += [
                f"{self.prefix}spent:{b.name}:{int(start)}",
                f"{self.prefix}reserved:{b.name}",
            ]
        values = await self.ledger.adb.mget(names) if names else []
        out = []
        for n, b in enumerate(budgets):
            out.append(Standing(b, window_start(b.window, moment).timestamp(),
                                window_end(b.window, moment).timestamp(),
                                int(values[2 * n] or 0), int(values[2 * n + 1] or 0)))  # fmt: skip
        return out
