"""The audit log of a daemon (agent or router): every control call, allowed or refused.

One JSON object per line in `state_dir/audit.jsonl`, appended and fsynced before the answer
goes out: when (unix time), who (the token's name, `anonymous` where no token is configured,
`no token` or `unknown token` for a refusal), from (the client's address), what (method and
path, and the request's JSON body with secret-looking fields replaced by `"<redacted>"`), the
outcome (status and, for a refusal or an error, its message), and the figures the daemon had
for the subject at the time (an agent: the deployment's precision, replicas and $/h).

The file is rotated when it passes `max_bytes` (`audit.jsonl.1`, `.2`, ... up to `keep`), so
it never grows without bound. A line torn by a kill -9 mid-write is detected: on open, a file
that does not end with a newline gets one (the torn line stays, alone on its line), and
readers skip lines that are not JSON, counting them. `AuditMiddleware` records every
non-GET request of an ASGI app; reads are not audited.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from wattops.vocabulary.openai import BodyTooLarge, read_body, replay

__all__ = ["AuditLog", "AuditMiddleware", "AuditPage", "redact"]

log = logging.getLogger("wattops")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SECRET_WORDS = ("token", "secret", "password", "key", "authorization")
#: Bodies larger than this are summarised, not kept whole.
MAX_BODY_BYTES = 16 * 1024


def redact(value: Any) -> Any:
    """`value` with every field whose name looks secret replaced (recursively)."""
    if isinstance(value, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class AuditPage(BaseModel):
    """`GET /v1/audit`: entries oldest first, and how many torn lines were skipped."""

    entries: list[dict[str, Any]]
    torn_lines: int = Field(0, description="lines a kill -9 left half-written, skipped")


class AuditLog:
    """Append-only JSON lines with fsync, rotated by size; torn lines skipped when read."""

    def __init__(self, path: Path, max_bytes: int = 10 * 2**20, keep: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._opened = False

    def open(self) -> None:
        """Make its folder and mend a torn last line; the daemon calls it once its state
        folder has been checked (a bad one is a config error, named, not a traceback here)."""
        if self._opened:
            return
        self._opened = True
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        log.warning("%s: its last line was torn (the daemon was killed while "
                                    "writing it); it is kept and skipped", path)  # fmt: skip
                        with path.open("ab") as out:
                            out.write(b"\n")
                            out.flush()
                            os.fsync(out.fileno())
        except FileNotFoundError:
            pass

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        self.open()
        with self._lock:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _rotate(self) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def read(self, since: float = 0.0, limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """(the last `limit` entries at or after `since`, oldest first; torn lines skipped)."""
        self.open()
        files = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self.keep, 0, -1)]
        entries: list[dict[str, Any]] = []
        torn = 0
        for path in [*files, self.path]:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            for raw in data.splitlines():
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw)
                except ValueError:
                    torn += 1
                    continue
                if isinstance(entry, dict) and float(entry.get("time", 0)) >= since:
                    entries.append(entry)
        return entries[-limit:], torn


class AuditMiddleware:
    """ASGI middleware: record every non-GET HTTP request of `app` in `audit`.

    `who(scope, authorization)` names the caller (the app leaves the caller it accepted in
    `scope["state"]["caller"]`); `figures(path)` gives the subject's figures, or None."""

    def __init__(
        self,
        app: ASGIApp,
        audit: AuditLog,
        daemon: str,
        who: Callable[[Scope, str | None], str],
        figures: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        self.app = app
        self.audit = audit
        self.daemon = daemon
        self.who = who
        self.figures = figures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)  # already held to the API's limit by the guard
        except BodyTooLarge:
            body = None
        if body is None:
            await self.app(scope, receive, send)  # gone, or too large: the app answers as it does
            return

        # The answer is held until its record is on disk: a client that saw it can count on
        # the audit log having it (control answers are small JSON bodies).
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        try:
            await self.app(scope, replay(body, receive), hold)
        finally:
            start = next((m for m in held if m["type"] == "http.response.start"), None)
            status = int(start["status"]) if start is not None else 500
            answer = b"".join(m.get("body", b"") for m in held
                              if m["type"] == "http.response.body")  # fmt: skip
            self._record(scope, body, status, answer if status >= 400 else b"")
        for message in held:
            await send(message)

    def _record(self, scope: Scope, body: bytes, status: int, answer: bytes) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = scope.get("client")
        what: Any = None
        if body:
            if len(body) > MAX_BODY_BYTES:
                what = f"<{len(body)} bytes>"
            else:
                try:
                    what = redact(json.loads(body))
                except ValueError:
                    what = "<not JSON>"
        entry: dict[str, Any] = {
            "time": round(time.time(), 3),
            "daemon": self.daemon,
            "who": self.who(scope, headers.get("authorization")),
            "from": f"{client[0]}:{client[1]}" if client else None,
            "method": scope["method"],
            "path": scope["path"],
            "body": what,
            "status": status,
            "outcome": "allowed"
            if status < 400
            else "refused"
            if status in (401, 403)
            else "error",
        }
        if status >= 400:
            try:
                error = json.loads(answer)
                entry["message"] = str(
                    error.get("message") or error.get("error", {}).get("message") or error
                )[:500]
            except (ValueError, AttributeError):
                entry["message"] = answer[:200].decode("utf-8", "replace")
        if self.figures is not None:
            found = self.figures(scope["path"])
            if found is not None:
                entry["figures"] = found
        try:
            self.audit.write(entry)
        except OSError as exc:  # the action happened: say loudly that its record did not
            log.error("audit log %s: cannot write: %s", self.audit.path, exc)
