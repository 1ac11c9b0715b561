"""What several benchmark scripts do with the agent they start: read one deployment from its
snapshot, and wait until it serves (or say why it cannot)."""

from __future__ import annotations

import time
from typing import Any

import httpx


def deployment(url: str, name: str) -> dict[str, Any]:
    """The deployment `name` in the agent's snapshot."""
    node = httpx.get(url + "/v1/node", timeout=10).json()
    return next(d for d in node["deployments"] if d["name"] == name)  # type: ignore[no-any-return]


def wait_serving(url: str, name: str, timeout_s: float = 600, accounted: bool = False) -> None:
    """Until `name` serves (and, with `accounted`, has its first accounting figures);
    RuntimeError with the agent's error if it failed, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            dep = deployment(url, name)
            if dep["state"] == "serving" and (dep.get("accounting") or not accounted):
                return
            if dep["state"] == "failed":
                raise RuntimeError(dep["last_error"])
        except (httpx.HTTPError, StopIteration, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} on {url} did not serve within {timeout_s:.0f} s")
