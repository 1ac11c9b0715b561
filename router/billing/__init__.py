"""Billing: who is asking and what it may cost, in one room.

- `money.py`: amounts as integers (nano-USD, millijoules, micrograms CO2e), rates per token,
  the one way a request is priced;
- `keys.py`: API keys (salted hashes); `budgets.py`: windows;
- `admission.py`: budgets, their spend and the reservations of requests in flight on one
  router (`BudgetBook`, over the SQLite `ledger.py`); `shared_book.py`: the same for several
  routers, as Lua scripts on Redis (`redis_ledger.py`); `store.py` opens the one the config
  names;
- `charging.py`: `Charging`, what the router's hot path calls: authenticate, admit (check
  and reserve), settle (price, write the row, release), and the store's outages;
- `report.py`: chargeback and forecasts; `verify.py`: the ledger re-added and compared.

The router's proxy calls `Charging` when a request arrives and when it ends; nothing else in
the router touches a budget, a reservation or the ledger.
"""
