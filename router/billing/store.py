"""Which store keeps keys, budgets and the ledger: opened from `[router]`'s `store`.

`sqlite` (the default): `ledger.sqlite` in the router's state dir, budgets counted in this
process (`ledger.py`, `admission.py`); one router. A Redis URL: everything in that Redis,
budgets counted by atomic scripts (`redis_ledger.py`, `shared_book.py`); several routers
behind a load balancer share it, and their per-key rate limits count in the same Redis.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from pathlib import Path

from limits.aio.storage import RedisStorage

from wattops.router.api import Budget
from wattops.router.billing.admission import BudgetBook
from wattops.router.billing.charging import Charging
from wattops.router.billing.ledger import Ledger
from wattops.router.config import RouterSection
from wattops.vocabulary import atomic_write

__all__ = ["open_charging", "router_id"]


def router_id(state_dir: Path) -> str:
    """This router's id among those sharing a store: made on the first start, then kept in
    `state_dir/router-id`, so a restart finds (and releases) what its last run reserved."""
    path = state_dir / "router-id"
    try:
        found = path.read_text().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    made = f"router-{secrets.token_hex(6)}"
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (made + "\n").encode())
    return made


def open_charging(section: RouterSection, budgets: Iterable[Budget] = ()) -> Charging:
    """Keys, budgets and the ledger on the store `section.store` names."""
    if section.store == "sqlite":
        book = BudgetBook(Ledger(section.state_dir / "ledger.sqlite", section.ledger_sync))
        return Charging(book, section.require_keys, section.default_max_tokens, budgets,
                        prior_tokens_per_s=section.prior_tokens_per_s,
                    on_store_error=section.on_store_error)  # fmt: skip
    from wattops.router.billing.redis_ledger import RedisLedger
    from wattops.router.billing.shared_book import SharedBudgetBook

    ledger = RedisLedger(section.store, section.store_prefix)
    shared = SharedBudgetBook(ledger, section.router_id or router_id(section.state_dir))
    uri = section.store
    if uri.startswith("unix://"):
        uri = "redis+unix://" + uri.removeprefix("unix://")  # the `limits` package's spelling
    limits = RedisStorage(uri, implementation="redispy", key_prefix=f"{section.store_prefix}limits")
    import redis

    return Charging(shared, section.require_keys, section.default_max_tokens, budgets,
                    limits_storage=limits, store_errors=(redis.RedisError,),
                    prior_tokens_per_s=section.prior_tokens_per_s,
                    on_store_error=section.on_store_error)  # fmt: skip
