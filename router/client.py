"""A client of the router's control API, for the console and scripts: `GET /v1/router`,
`PATCH /v1/routes/{name}`, `/v1/keys` and `/v1/budgets`. Imports only aiohttp and the router's
schema (`api.py`); aiohttp, not httpx, as the fleet core's agent client: httpx's command-line
module pulls in `rich` whenever it is installed, and headless code must not."""

from __future__ import annotations

from typing import Any

import aiohttp

from wattops.router.api import (
    Bounds,
    Budget,
    BudgetView,
    KeyCreate,
    KeyCreated,
    KeyView,
    LedgerCheck,
    Report,
    RouterView,
)
from wattops.vocabulary.net import http_connector
from wattops.vocabulary.tls import client_ssl

__all__ = ["RouterClient", "RouterError"]


class RouterError(Exception):
    """The router refused or could not be reached; the message says which and why."""


def _message(status: int, body: bytes) -> str:
    import json

    try:
        error = json.loads(body).get("error") or {}
        return str(error.get("message") or body[:300].decode("utf-8", "replace"))
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", "replace")


class RouterClient:
    """One router, over HTTP. The session is made on first use, on the caller's loop."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=self.timeout,
                connector=http_connector(ssl=client_ssl()),
            )  # fmt: skip
        try:
            async with self._session.request(method, self.url + path, json=body) as response:
                data = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RouterError(
                f"router {self.url} unreachable: {exc or type(exc).__name__}"
            ) from None
        if status >= 400:
            raise RouterError(f"router {self.url} answered {status}: {_message(status, data)}")
        return data

    async def view(self) -> RouterView:
        """Every route: its bounds, its candidates' figures and split, what it saved."""
        return RouterView.model_validate_json(await self._call("GET", "/v1/router"))

    async def patch(self, route: str, **changes: Any) -> Bounds:
        """Change a route's policy or bounds (None clears a bound); returns the new bounds."""
        return Bounds.model_validate_json(await self._call("PATCH", f"/v1/routes/{route}", changes))

    # -- keys and budgets (admin token) ----------------------------------------------------

    async def create_key(self, asked: KeyCreate) -> KeyCreated:
        """A new key; its secret is in the answer, this once."""
        data = await self._call("POST", "/v1/keys", asked.model_dump(exclude_none=True))
        return KeyCreated.model_validate_json(data)

    async def keys(self) -> list[KeyView]:
        import json

        return [KeyView.model_validate(k) for k in json.loads(await self._call("GET", "/v1/keys"))]

    async def key(self, key_id: str) -> KeyView:
        return KeyView.model_validate_json(await self._call("GET", f"/v1/keys/{key_id}"))

    async def update_key(self, key_id: str, **changes: Any) -> KeyView:
        data = await self._call("PATCH", f"/v1/keys/{key_id}", changes)
        return KeyView.model_validate_json(data)

    async def revoke_key(self, key_id: str) -> KeyView:
        return KeyView.model_validate_json(await self._call("DELETE", f"/v1/keys/{key_id}"))

    async def budgets(self) -> list[BudgetView]:
        import json

        data = json.loads(await self._call("GET", "/v1/budgets"))
        return [BudgetView.model_validate(b) for b in data]

    async def put_budget(self, budget: Budget, force: bool = False) -> BudgetView:
        """Make a budget; with `force`, though its key, team or route is not known yet."""
        path = "/v1/budgets?force=true" if force else "/v1/budgets"
        data = await self._call("POST", path, budget.model_dump())
        return BudgetView.model_validate_json(data)

    async def patch_budget(self, name: str, **changes: Any) -> BudgetView:
        data = await self._call("PATCH", f"/v1/budgets/{name}", changes)
        return BudgetView.model_validate_json(data)

    async def delete_budget(self, name: str) -> None:
        await self._call("DELETE", f"/v1/budgets/{name}")

    async def verify_ledger(self) -> LedgerCheck:
        """The router's ledger re-added and compared (`GET /v1/ledger/verify`)."""
        return LedgerCheck.model_validate_json(await self._call("GET", "/v1/ledger/verify"))

    async def report(self, by: str, since: float, until: float | None = None) -> Report:
        """Chargeback per key, team or route over [since, until), with budget forecasts."""
        query = f"/v1/report?by={by}&since={since}" + (f"&until={until}" if until else "")
        return Report.model_validate_json(await self._call("GET", query))
