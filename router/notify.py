"""Budget warnings as webhooks: one JSON POST per warning to each configured URL.

The body carries `text` (what a Slack incoming webhook shows; Mattermost and Teams' Slack-
compatible hooks read the same field) and the warning's fields for generic receivers: budget,
description, threshold, spent, limit, unit, window_start, time. A receiver that fails (a 4xx
other than 408/429 is final; a 5xx, 408, 429, a refused connection or a timeout are retried)
is retried with exponential backoff (tenacity: 0.5 s doubling to 30 s, 6 attempts); each
final failure is counted in `wattops_budget_webhook_failures_total{url}` and kept as the last
error in `GET /v1/router`, so a broken receiver is visible, not silent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from wattops.router.billing.admission import BudgetWarning

__all__ = ["Notifier"]

log = logging.getLogger("wattops.router")


class _Retry(Exception):
    """A failure worth trying again."""


class Notifier:
    """Sends each warning to every URL in the background, retrying each on its own."""

    def __init__(self, urls: list[str], session: aiohttp.ClientSession, timeout_s: float = 5.0,
                 attempts: int = 6, first_wait_s: float = 0.5) -> None:  # fmt: skip
        self.urls = urls
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.attempts = attempts
        self.first_wait_s = first_wait_s
        self.sent = 0
        self.failed = 0
        self.last_error: str | None = None
        #: Called with the URL of each final failure (the router counts it in its metrics).
        self.on_failure: Callable[[str], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, warning: BudgetWarning) -> None:
        """Queue `warning` for every URL (called from the event loop; returns at once)."""
        body = {"text": f":warning: wattops-router: {warning.message()}", **asdict(warning)}
        for url in self.urls:
            task = asyncio.get_running_loop().create_task(self._post(url, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, body: dict[str, object]) -> None:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=self.first_wait_s, max=30),
                retry=retry_if_exception_type(_Retry),
            ):
                with attempt:
                    await self._once(url, body)
        except (RetryError, _Final) as exc:
            self.failed += 1
            cause = exc.last_attempt.exception() if isinstance(exc, RetryError) else exc
            self.last_error = f"{url}: {cause}"
            log.error("budget webhook failed for good: %s", self.last_error)
            if self.on_failure is not None:
                self.on_failure(url)
            return
        self.sent += 1

    async def _once(self, url: str, body: dict[str, object]) -> None:
        try:
            async with self.session.post(url, json=body, timeout=self.timeout) as resp:
                text = (await resp.read())[:200].decode("utf-8", "replace")
                if resp.status < 300:
                    return
                if resp.status >= 500 or resp.status in (408, 429):
                    raise _Retry(f"HTTP {resp.status}: {text}")
                raise _Final(f"HTTP {resp.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retry(str(exc) or type(exc).__name__) from None

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Let warnings in flight finish (on shutdown), for at most `timeout_s`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)


class _Final(Exception):
    """A failure that retrying cannot fix (a 4xx): given up at once."""
