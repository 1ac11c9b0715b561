"""An HTTP client for one agent's API, shared by the CLI, the console and the fleet targets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from wattops.agents.api import Accepted, CanaryRequest, NodeSnapshot, PolicyStatus
from wattops.vocabulary.access import WhoAmI
from wattops.vocabulary.audit import AuditPage
from wattops.vocabulary.net import http_connector
from wattops.vocabulary.tls import client_ssl


def agent_url(text: str) -> str:
    """An agent's base URL as given on a command line or in an inventory: `host:port` means
    `http://host:port`; a trailing slash is dropped. ValueError for what cannot be one."""
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ValueError(f"{text!r} is not an agent URL; give http://HOST:PORT (or HOST:PORT)")
    return url


def describe_error(exc: BaseException) -> str:
    """Why a connection to an agent failed, in words (never empty)."""
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        cause = exc.os_error.strerror if isinstance(exc, aiohttp.ClientConnectorError) else ""
        return f"cannot connect ({cause or 'connection refused'})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class AgentError(Exception):
    """The agent refused or failed a call; `message` is the agent's own explanation."""

    def __init__(
        self, url: str, status: int, code: str, message: str, allowed: list[str] | None = None
    ) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.status = status
        self.code = code
        self.message = message
        self.allowed = allowed


class AgentUnreachable(AgentError):
    """No answer from the agent (refused, timed out, DNS)."""


class AgentClient:
    """Async client for one agent. Control calls send the operator token when there is one."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 10.0,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._own = http is None
        self.http = http or aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=http_connector(ssl=client_ssl()),
        )

    async def close(self) -> None:
        """Close the connection pool if this client made it."""
        if self._own:
            await self.http.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        # Reads too: an agent whose `reads = "viewer"` wants a token for them.
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with self.http.request(
                method, self.url + path, json=body, headers=headers
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AgentUnreachable(self.url, 0, "unreachable", describe_error(exc)) from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if status >= 400:
            if isinstance(data, dict):
                message, code = data.get("message") or str(data), data.get("error", "error")
                allowed = data.get("allowed")
            else:
                message, code, allowed = text[:200], "error", None
            raise AgentError(self.url, status, code, message, allowed)
        if data is None:
            raise AgentError(self.url, status, "bad_answer", f"not JSON: {text[:200]!r}")
        return data

    async def node(self) -> NodeSnapshot:
        """GET /v1/node."""
        return NodeSnapshot.model_validate(await self._call("GET", "/v1/node"))

    async def audit(self, since: float = 0.0, limit: int = 1000) -> AuditPage:
        """GET /v1/audit: the agent's audit log (an operator's or admin's token)."""
        data = await self._call("GET", f"/v1/audit?since={since}&limit={limit}")
        return AuditPage.model_validate(data)

    async def whoami(self) -> WhoAmI:
        """GET /v1/whoami: what this client's token may do on the agent."""
        return WhoAmI.model_validate(await self._call("GET", "/v1/whoami"))

    async def scale(self, deployment: str, replicas: int) -> Accepted:
        """POST /v1/deployments/{deployment}/scale."""
        data = await self._call(
            "POST", f"/v1/deployments/{deployment}/scale", {"replicas": replicas}
        )
        return Accepted.model_validate(data)

    async def precision(self, deployment: str, precision: str,
                        canary: CanaryRequest | None = None) -> Accepted:  # fmt: skip
        """POST /v1/deployments/{deployment}/precision (with `canary`: tried first)."""
        body: dict[str, Any] = {"precision": precision}
        if canary is not None:
            body["canary"] = canary.model_dump(mode="json")
        data = await self._call("POST", f"/v1/deployments/{deployment}/precision", body)
        return Accepted.model_validate(data)

    async def abort_canary(self, deployment: str) -> Accepted:
        """DELETE /v1/deployments/{deployment}/canary."""
        data = await self._call("DELETE", f"/v1/deployments/{deployment}/canary")
        return Accepted.model_validate(data)

    async def policy(self, paused: bool) -> PolicyStatus:
        """POST /v1/policy: pause the node's policy (it keeps planning) or let it act again."""
        return PolicyStatus.model_validate(await self._call("POST", "/v1/policy",
                                                            {"paused": paused}))  # fmt: skip

    async def act(self, deployment: str, action: str, target: str | int) -> Accepted:
        """`scale` to a replica count or switch `precision`: the two control actions."""
        if action == "scale":
            return await self.scale(deployment, int(target))
        if action == "precision":
            return await self.precision(deployment, str(target))
        if action == "canary":  # the defaults: 10% of traffic for 5 min, the default guards
            return await self.precision(deployment, str(target), CanaryRequest())
        raise ValueError(f"unknown action {action!r}; allowed: scale, precision, canary")


async def fetch_snapshots(
    urls: Sequence[str], timeout_s: float = 5.0, token: str | None = None
) -> list[tuple[str, NodeSnapshot | None, str | None]]:
    """Every agent's snapshot once, concurrently: (url, snapshot or None, error or None);
    `token` for agents whose reads need one (`reads = "viewer"`)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = http_connector(ssl=client_ssl())
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def one(url: str) -> tuple[str, NodeSnapshot | None, str | None]:
            try:
                return url, await AgentClient(url, token=token, http=http).node(), None
            except AgentError as exc:
                return url, None, exc.message

        return list(await asyncio.gather(*(one(u) for u in urls)))
