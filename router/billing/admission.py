"""Admission against budgets, with reservations.

Before a request is forwarded, every budget that covers it (its key's, its team's, its
route's, the fleet's) is checked: **over** when what was spent in the window plus what requests
in flight have reserved is at or above the limit (`>=`). A request that passes reserves its
worst case (an upper bound of its prompt tokens, plus `max_tokens`, at the highest rates of the
candidates it may be served by) on each of those budgets; when it ends, the reservation is
replaced by what it actually cost (written to the ledger first), or simply released if it
failed. The check and the reservation run with no await in between, on the router's one event
loop, so they are atomic: under any concurrency a budget's spend can pass its limit by at most
what requests in flight had reserved when it crossed.

Spend per budget and window is kept in memory, read from the ledger when a window is first
needed (at start, and when a new hour, day or month begins), and added to at every settle.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from wattops.router.billing.budgets import UNIT_LABELS, Budget, utc_moment, window_end, window_start
from wattops.router.billing.ledger import Entry, Ledger
from wattops.router.billing.money import Amounts, from_units, show
from wattops.router.billing.verify import Live

__all__ = [
    "Admission",
    "Amounts",
    "Book",
    "BudgetBook",
    "BudgetExceeded",
    "BudgetWarning",
    "Standing",
    "ring",
    "verdict",
]

log = logging.getLogger("wattops.router")


@dataclass(frozen=True)
class Standing:
    """Where one budget stands now, in its unit's integers (`money.py`)."""

    budget: Budget
    window_start: float
    resets_at: float
    spent: int
    reserved: int

    @property
    def limit(self) -> int:
        return self.budget.limit_units

    @property
    def used(self) -> int:
        return self.spent + self.reserved

    @property
    def over(self) -> bool:
        return self.used >= self.limit

    @property
    def degrading(self) -> bool:
        b = self.budget
        return b.degrade_at is not None and self.used >= b.degrade_at * self.limit

    @property
    def remaining(self) -> int:
        """Never negative."""
        return max(0, self.limit - self.used)


class BudgetExceeded(Exception):
    """A budget covering the request is spent; the message names it and when it resets."""

    def __init__(self, standing: Standing, now: float) -> None:
        b = standing.budget
        resets = utc_moment(standing.resets_at)
        super().__init__(
            f"budget {b.name!r} ({b.describe()}) is spent: {show(standing.spent, b.unit)} spent "
            f"and {show(standing.reserved, b.unit)} reserved by requests in flight, limit "
            f"{show(standing.limit, b.unit)}; it resets at {resets}"
        )
        self.standing = standing
        self.retry_after_s = max(1, math.ceil(standing.resets_at - now))


@dataclass(frozen=True)
class BudgetWarning:
    """A budget passed one of its warning thresholds (fired once per window). `spent` and
    `limit` in the budget's unit, for people; `spent_units` exactly."""

    budget: str
    description: str
    threshold: float
    spent: float
    limit: float
    unit: str
    window_start: float
    time: float
    spent_units: int = 0

    def message(self) -> str:
        return (
            f"budget {self.budget} ({self.description}) at {self.spent / self.limit:.0%} of its "
            f"limit: {show(self.spent_units, self.unit)} of {self.limit:.9g} "
            f"{UNIT_LABELS[self.unit]} "
            f"(warning at {self.threshold:.0%})"
        )


@dataclass
class Admission:
    """One request let in: what it reserved, on which budgets."""

    request_id: str
    key_id: str | None
    team: str | None
    route: str | None
    reserved: Amounts
    budgets: list[str]
    #: The budget whose degrade threshold sent this request to a cheaper candidate.
    degraded_by: Budget | None = None
    done: bool = False
    #: What was added to each budget's reservations (given back exactly, whatever becomes of
    #: the budget meanwhile).
    held: dict[str, int] = field(default_factory=dict)
    #: The first covering budget past its degrade threshold when it was let in (found with
    #: the reservation: one round trip on Redis), if any.
    degrading: Standing | None = None


class Book(Protocol):
    """What the router asks of budgets, whichever store keeps them: `BudgetBook` (this
    process, over SQLite) or `SharedBudgetBook` (several routers, over Redis)."""

    ledger: Any
    on_warning: Callable[[BudgetWarning], None] | None
    warnings: deque[BudgetWarning]
    _fired: set[tuple[str, float, float]]

    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def budgets(self) -> Mapping[str, Budget]: ...
    def put(self, budget: Budget) -> None: ...
    def delete(self, name: str) -> None: ...
    def may_cover(self, key_id: str | None, team: str | None, route: str | None) -> bool: ...
    def standing(self, budget: Budget, now: float | None = None) -> Standing: ...
    def standings(self) -> Iterable[Standing]: ...
    def check(self, key_id: str | None, team: str | None, route: str | None
              ) -> tuple[Standing | None, Standing | None]: ...  # fmt: skip
    def admit(self, request_id: str, key_id: str | None, team: str | None, route: str | None,
              worst: Amounts, degraded_by: Budget | None = None) -> Admission: ...  # fmt: skip
    def release(self, admission: Admission) -> None: ...
    def settle(self, admission: Admission | None, entry: Entry) -> None: ...
    def heartbeat(self, own: bool = False) -> int: ...
    # What the router's hot path calls: never a blocking call on its event loop.
    async def acheck(self, key_id: str | None, team: str | None, route: str | None
                     ) -> tuple[Standing | None, Standing | None]: ...  # fmt: skip
    async def aadmit(self, request_id: str, key_id: str | None, team: str | None,
                     route: str | None, worst: Amounts) -> Admission: ...  # fmt: skip
    async def arelease(self, admission: Admission) -> None: ...
    async def asettle(self, admission: Admission | None, entry: Entry) -> None: ...
    async def aheartbeat(self) -> int: ...
    async def astandings(self) -> Iterable[Standing]: ...


def verdict(standings: Iterable[Standing]) -> tuple[Standing | None, Standing | None]:
    """(the first budget that is over, the first that degrades) among `standings`."""
    over = degrading = None
    for s in standings:
        if s.over and over is None:
            over = s
        elif s.degrading and degrading is None:
            degrading = s
    return over, degrading


def due(book: Book, s: Standing) -> list[float]:
    """The thresholds `s` has passed that this process has not fired yet (marked fired)."""
    b = s.budget
    out = []
    for threshold in b.warn_at:
        if s.spent < threshold * s.limit:
            break
        mark = (b.name, s.window_start, threshold)
        if mark not in book._fired:
            book._fired.add(mark)
            out.append(threshold)
    return out


def fire(book: Book, s: Standing, threshold: float) -> None:
    """The warning for `threshold`, which the store says no router fired yet."""
    b = s.budget
    warning = BudgetWarning(b.name, b.describe(), threshold, from_units(s.spent, b.unit),
                            b.limit, b.unit, s.window_start, book.clock(), s.spent)  # fmt: skip
    book.warnings.append(warning)
    log.warning("%s", warning.message())
    if book.on_warning is not None:
        book.on_warning(warning)


def ring(book: Book, s: Standing) -> None:
    """Fire the warnings `s` has passed, once per threshold and window: once in this process
    (a set), and once across restarts and routers (the store's `warn_once`)."""
    b = s.budget
    for threshold in due(book, s):
        spent = from_units(s.spent, b.unit)
        if book.ledger.warn_once(b.name, s.window_start, threshold, spent, b.limit):
            fire(book, s, threshold)  # else fired before a restart, or by another router


@dataclass
class BudgetBook:
    """Budgets, their spend per window, and the reservations of requests in flight."""

    ledger: Ledger
    clock: Callable[[], float] = time.time
    on_warning: Callable[[BudgetWarning], None] | None = None
    budgets: dict[str, Budget] = field(default_factory=dict)
    #: budget name -> (window start, window end) (unix times), and what it spent in it
    _window: dict[str, tuple[float, float]] = field(default_factory=dict)
    _spent: dict[str, int] = field(default_factory=dict)
    #: budget name -> the last ledger commit its window's spend was read with (a row of a
    #: later commit is added by its own settle; one of that commit or before already counts)
    _loaded_at: dict[str, int] = field(default_factory=dict)
    _reserved: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, Admission] = field(default_factory=dict)
    warnings: deque[BudgetWarning] = field(default_factory=lambda: deque(maxlen=200))
    #: (budget, window start, threshold) known to have fired: no ledger write to find out.
    _fired: set[tuple[str, float, float]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.budgets = {b.name: b for b in self.ledger.budgets()}

    # -- budgets ---------------------------------------------------------------------------

    def put(self, budget: Budget) -> None:
        """Create or replace a budget (its spend is the ledger's, whatever the change)."""
        self.ledger.put_budget(budget)
        self.budgets[budget.name] = budget
        self._window.pop(budget.name, None)

    def delete(self, name: str) -> None:
        self.ledger.delete_budget(name)
        self.budgets.pop(name, None)
        self._window.pop(name, None)

    def covering(self, key_id: str | None, team: str | None, route: str | None) -> list[Budget]:
        return [b for b in self.budgets.values() if b.covers(key_id, team, route)]

    def may_cover(self, key_id: str | None, team: str | None, route: str | None) -> bool:
        return bool(self.covering(key_id, team, route))

    def heartbeat(self, own: bool = False) -> int:
        """Nothing to say: reservations live and die with this process."""
        return 0

    def standing(self, budget: Budget, now: float | None = None) -> Standing:
        now = self.clock() if now is None else now
        name = budget.name
        window = self._window.get(name)
        if window is None or not window[0] <= now < window[1]:
            # A window not seen yet (or a new hour, day, month): its spend is the ledger's.
            moment = datetime.fromtimestamp(now, UTC)
            window = (window_start(budget.window, moment).timestamp(),
                      window_end(budget.window, moment).timestamp())  # fmt: skip
            self._spent[name], self._loaded_at[name] = self.ledger.spent_committed(
                budget, window[0]
            )
            self._window[name] = window
        return Standing(budget, window[0], window[1], self._spent[name],
                        self._reserved.get(name, 0))  # fmt: skip

    # -- admission -------------------------------------------------------------------------

    def check(self, key_id: str | None, team: str | None, route: str | None
              ) -> tuple[Standing | None, Standing | None]:  # fmt: skip
        """(the first budget that is over, the first that degrades) for such a request."""
        now = self.clock()
        return verdict(self.standing(b, now) for b in self.covering(key_id, team, route))

    def admit(self, request_id: str, key_id: str | None, team: str | None, route: str | None,
              worst: Amounts, degraded_by: Budget | None = None) -> Admission:  # fmt: skip
        """Let the request in and reserve `worst`; BudgetExceeded naming the budget if over."""
        now = self.clock()
        covering = self.covering(key_id, team, route)
        over, degrading = verdict(self.standing(b, now) for b in covering)
        if over is not None:
            raise BudgetExceeded(over, now)
        held = {b.name: worst.of(b.unit) for b in covering}
        for name, amount in held.items():
            self._reserved[name] = self._reserved.get(name, 0) + amount
        admission = Admission(request_id, key_id, team, route, worst, list(held), degraded_by,
                              held=held, degrading=degrading)  # fmt: skip
        self.in_flight[request_id] = admission
        return admission

    def release(self, admission: Admission) -> None:
        """Give back what `admission` reserved (it failed, or its cost is now settled)."""
        if admission.done:
            return
        admission.done = True
        self.in_flight.pop(admission.request_id, None)
        for name, amount in admission.held.items():
            self._reserved[name] = self._reserved.get(name, 0) - amount

    def settle(self, admission: Admission | None, entry: Entry) -> None:
        """Write the request's ledger row, count it against its budgets, release its
        reservation, and fire the warnings it set off (at once: tools and tests; the router
        settles with `asettle`)."""
        now = self.clock()
        covering = self.covering(entry.key_id, entry.team, entry.route)
        for budget in covering:  # windows read from the ledger before this row is in it
            self.standing(budget, now)
        try:
            new, number = self.ledger.record_batch(entry)
        finally:
            if admission is not None:
                self.release(admission)
        if new:
            self._count(entry, covering, number, now)

    async def asettle(self, admission: Admission | None, entry: Entry) -> None:
        """`settle` through the ledger's group commit: returns once the row is durable. Its
        reservation holds until then (the row's cost is at most what it reserved), then is
        replaced by the cost, with no await between; a caller cancelled meanwhile changes
        nothing of that."""
        now = self.clock()
        covering = self.covering(entry.key_id, entry.team, entry.route)
        for budget in covering:
            self.standing(budget, now)
        written = self.ledger.submit(entry)

        def done(future: asyncio.Future[tuple[bool, int]]) -> None:
            if admission is not None:
                self.release(admission)
            if future.cancelled() or future.exception() is not None:
                return
            new, number = future.result()
            if new:
                self._count(entry, covering, number, now)

        written.add_done_callback(done)
        await asyncio.shield(written)

    def _count(self, entry: Entry, covering: list[Budget], number: int, now: float) -> None:
        """Add a row made durable by commit `number` to the windows that do not hold it."""
        for budget in covering:
            window = self._window.get(budget.name)
            if window is None or not window[0] <= entry.time < window[1]:
                continue  # deleted meanwhile, or a window that began since (read with it)
            if self._loaded_at[budget.name] < number:
                self._spent[budget.name] += entry.amount(budget.unit)
            self._warn(self.standing(budget, now))

    # -- the router's calls (nothing here waits: the SQLite store is this process's) ----------

    async def acheck(self, key_id: str | None, team: str | None, route: str | None
                     ) -> tuple[Standing | None, Standing | None]:  # fmt: skip
        return self.check(key_id, team, route)

    async def aadmit(self, request_id: str, key_id: str | None, team: str | None,
                     route: str | None, worst: Amounts) -> Admission:  # fmt: skip
        return self.admit(request_id, key_id, team, route, worst)

    async def arelease(self, admission: Admission) -> None:
        self.release(admission)

    async def aheartbeat(self) -> int:
        return 0

    async def astandings(self) -> Iterable[Standing]:
        return self.standings()

    def _warn(self, s: Standing) -> None:
        ring(self, s)

    def standings(self) -> Iterable[Standing]:
        now = self.clock()
        return [self.standing(b, now) for b in self.budgets.values()]

    def live(self) -> Live:
        """What this router holds in memory, with the last ledger row it includes (for
        `verify.py`; read on the event loop, between settles)."""
        (last,) = self.ledger.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM entries").fetchone()
        held: dict[str, int] = {}
        for admission in self.in_flight.values():
            for name, amount in admission.held.items():
                held[name] = held.get(name, 0) + amount
        windows = {name: (w[0], w[1], self._spent[name]) for name, w in self._window.items()}
        return Live(int(last), windows, dict(self._reserved), held)
