"""The router's OpenAI-compatible endpoint: the hot path.

`POST /v1/chat/completions` and `/v1/completions` with `"model"` naming a route (or one
deployment as `node/deployment`): the route's candidates are chosen (`choose.py`), then tried
in order. A candidate that fails before its answer reaches the client — connection refused,
no connection within `connect_timeout_s`, a 5xx from its agent (no replica, replica failed),
its circuit breaker open, or an unstreamed answer broken off after its headers — is skipped
for the next; a 4xx is the request's own fault and goes back to the
client as the agent said it. Streams pass through chunk by chunk. Every answer says where it
went and why: `X-Wattops-Route`, `X-Wattops-Served-By` (`node/deployment@precision`),
`X-Wattops-Decision`, and the agent's `X-Wattops-Est-*` and `X-Cache` headers.

A plain ASGI app in front of the FastAPI control API, as on the agent, with one aiohttp
session for forwarding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
from purgatory.domain.model import OpenedState
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from wattops.router.billing.charging import Refusal, Ticket, worst_tokens
from wattops.router.candidates import Candidate
from wattops.router.choose import Choice, NoCandidate, choose
from wattops.router.core import BadRequestHeader, Router, Usage
from wattops.vocabulary.openai import MAX_BODY_BYTES, BodyTooLarge, error_body, read_body

log = logging.getLogger("wattops.router")

__all__ = ["OPENAI_PATHS", "RouterGateway"]

_JSON = "application/json"
CHAT_PATH = "/v1/chat/completions"
OPENAI_PATHS = frozenset({"/v1/models", CHAT_PATH, "/v1/completions"})
_PASSED_HEADERS = ("X-Cache", "X-Wattops-Est-Energy-J", "X-Wattops-Est-Cost-USD")
#: A stream the client broke off before its end (nginx's status for a closed request).
CLIENT_CLOSED = 499


class _Failed(Exception):
    """A candidate failed before answering: try the next one."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _error(status: int, message: str, code: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> Response:  # fmt: skip
    return Response(orjson.dumps(error_body(status, message, code, param)), status_code=status,
                    media_type=_JSON, headers=headers)  # fmt: skip


def store_unavailable(exc: Exception) -> Response:
    """503 for a request whose keys and budgets could not be checked or charged (fail closed:
    a budget that cannot be read is not a budget that lets everything through)."""
    log.error("the router's store is unreachable: %s", exc)
    return _error(503, f"the router's store (keys, budgets, ledger) is unreachable: {exc}; "
                  "retry shortly", "store_unavailable", headers={"Retry-After": "1"})  # fmt: skip


def _usage_of(data: bytes) -> Usage | None:
    try:
        usage = orjson.loads(data).get("usage") or {}
        return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


def _asked_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed request asked for the usage chunk itself (`stream_options`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _confidence(data: bytes) -> float | None:
    """The answer's mean token log-probability (chat or completion format); None without."""
    try:
        logprobs = orjson.loads(data)["choices"][0].get("logprobs") or {}
        if "content" in logprobs:
            values = [t["logprob"] for t in logprobs["content"] or []]
        else:
            values = [v for v in logprobs.get("token_logprobs") or [] if v is not None]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return sum(values) / len(values) if values else None


def _without_logprobs(data: bytes) -> bytes:
    """The answer as the client asked for it: the cascade's log-probabilities taken out."""
    try:
        answer = orjson.loads(data)
        for choice in answer["choices"]:
            choice["logprobs"] = None
        return orjson.dumps(answer)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return data


class RouterGateway:
    """Serves the OpenAI paths for every route."""

    def __init__(self, router: Router, session: aiohttp.ClientSession) -> None:
        self.router = router
        self.session = session
        cfg = router.config.router
        self.timeout = aiohttp.ClientTimeout(
            total=cfg.request_timeout_s, sock_connect=cfg.connect_timeout_s
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/v1/models":
            if method in ("GET", "HEAD"):
                response = self.models()
            else:
                response = _error(405, "use GET", "method_not_allowed")
        elif method != "POST":
            response = _error(405, "use POST", "method_not_allowed")
        else:
            try:
                raw = await read_body(receive)
            except BodyTooLarge:
                raw = None
                response = _error(413, f"the body is over {MAX_BODY_BYTES} bytes", "body_too_large")
            else:
                if raw is None:
                    return
                headers: dict[str, str] = {}
                authorization = None
                for k, v in scope["headers"]:
                    if k.startswith(b"x-wattops-"):
                        headers[k.decode("latin-1")] = v.decode("latin-1")
                    elif k == b"authorization":
                        authorization = v.decode("latin-1")
                try:
                    response = await self._handle(raw, path, headers, authorization)
                except self.router.charging.store_errors as exc:
                    response = store_unavailable(exc)
        await response(scope, receive, send)

    def models(self) -> Response:
        """Routes first, then every deployment as node/deployment."""
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "wattops-router"}
                for name in self.router.routes]  # fmt: skip
        data += [{"id": key, "object": "model", "created": 0, "owned_by": "wattops-router"}
                 for key in sorted(self.router.deployments())]  # fmt: skip
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=_JSON)

    async def _handle(self, raw: bytes, path: str, headers: dict[str, str],
                      authorization: str | None = None) -> Response:  # fmt: skip
        charging = self.router.charging
        try:
            caller = await charging.authenticate(authorization)
        except Refusal as refused:
            return _error(refused.status, str(refused), refused.code,
                          headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_body")
        name = body.get("model")
        if not isinstance(name, str):
            return _error(400, "`model` must be a route or node/deployment", "invalid_value",
                          "model")  # fmt: skip
        router = self.router
        route = router.routes.get(name)
        every = router.deployments()
        if route is None:
            direct = every.get(name)
            if direct is None:
                return _error(
                    404,
                    f"model {name!r} is neither a route nor a node/deployment; routes: "
                    f"{', '.join(router.routes) or 'none'}",
                    "model_not_found",
                    "model",
                )
            choice = Choice([direct], "addressed directly")
            ticket = charging.ticket(caller, None, every)
            try:
                await charging.limit_rate(ticket, body)
                await charging.admit(ticket, body, choice.ordered, every)
            except Refusal as refused:
                self._refused(refused)
                return _error(refused.status, str(refused), refused.code, headers=refused.headers)
            return await self._guarded(ticket, None, choice, None, path, body, {})
        try:
            bounds = router.constraints(route, headers, stream=bool(body.get("stream")))
        except BadRequestHeader as exc:
            return _error(400, str(exc), "invalid_header")
        cands = router.candidates(route, every)
        try:
            choice = choose(route.name, cands, router.quality_of(route, cands), bounds,
                            router.unavailable(cands), router.spread(route, body))  # fmt: skip
        except NoCandidate as exc:
            await router.record(route.name, None, None, None, None, 503, [], str(exc))
            return _error(503, str(exc), "no_candidate",
                          headers={"X-Wattops-Route": route.name})  # fmt: skip
        out = {"X-Wattops-Route": route.name}
        ticket = charging.ticket(caller, route.name, every)
        try:
            await charging.limit_rate(ticket, body)
            cascade = None
            if bounds.policy == "cascade" and not body.get("stream"):
                cascade = route.cascade_min_logprob
            # Checked and reserved in one step; a budget past its degrade threshold sends the
            # request to a cheaper candidate (reserved again only if that may cost more).
            degrading = await charging.admit(ticket, body, choice.ordered, every,
                                             cascade=cascade is not None)  # fmt: skip
            if degrading is not None:
                choice = self._degraded(route.name, cands, bounds, choice, degrading, ticket)
                out["X-Wattops-Degraded"] = ticket.degraded or ""
                await charging.readmit(ticket, body, choice.ordered, every,
                                       cascade=cascade is not None)  # fmt: skip
        except Refusal as refused:
            self._refused(refused)
            return _error(refused.status, str(refused), refused.code,
                          headers={**out, **refused.headers})  # fmt: skip
        reference = every.get(route.reference)
        return await self._guarded(ticket, route.name, choice, reference, path, body, out,
                                   cascade)  # fmt: skip

    def _refused(self, refused: Refusal) -> None:
        name = refused.headers.get("X-Wattops-Budget")
        if name:
            self.router.m_budget_refusals.labels(name).inc()

    def _degraded(self, route: str, cands: list[Candidate], bounds: Any, choice: Choice,
                  degrading: Any, ticket: Ticket) -> Choice:  # fmt: skip
        """The cheapest candidate that meets the degrading budget's own quality floor (the
        route's latency and price bounds still hold); the original choice if none does."""
        b = degrading.budget
        router = self.router
        cheaper = dataclasses.replace(bounds, policy="cheapest", min_quality=b.degrade_min_quality,
                                      max_accuracy_drop=None)  # fmt: skip
        floor = f" with quality >= {b.degrade_min_quality:g}" if b.degrade_min_quality else ""
        why = (f"budget {b.name} at {degrading.used / b.limit:.0%} of its limit "
               f"({b.describe()}): cheapest candidate{floor}")  # fmt: skip
        try:
            found = choose(
                route,
                cands,
                router.quality_of(router.routes[route], cands),
                cheaper,
                router.unavailable(cands),
                router.spread(router.routes[route], {}),
            )
        except NoCandidate:
            ticket.degraded = why + ": none meets it, served as routed"
            return choice
        ticket.degraded = why
        router.m_budget_degraded.labels(b.name).inc()
        return Choice(found.ordered, f"{found.reason}; degraded: {why}", found.excluded)

    async def _guarded(
        self,
        ticket: Ticket,
        route: str | None,
        choice: Choice,
        reference: Candidate | None,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        cascade: float | None = None,
    ) -> Response:
        """Forward; whatever escapes, the request's reservation is given back."""
        try:
            return await self._forward(route, choice, reference, path, body, headers, cascade,
                                       ticket)  # fmt: skip
        except BaseException:
            await asyncio.shield(self.router.charging.release(ticket))
            raise

    async def _forward(
        self,
        route: str | None,
        choice: Choice,
        reference: Candidate | None,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        cascade: float | None = None,
        ticket: Ticket | None = None,
    ) -> Response:
        router = self.router
        fallbacks: list[str] = []
        escalated: list[str] = []
        #: The last answer the cascade set aside: returned if every surer candidate fails.
        set_aside: tuple[Candidate, dict[str, str], bytes, str] | None = None
        stream = bool(body.get("stream"))
        asked_logprobs = body.get("logprobs")
        if cascade is not None:  # the answer's confidence is read from its log-probabilities
            body["logprobs"] = True if path == CHAT_PATH else (asked_logprobs or 0)
        client_usage = True
        if stream:  # every stream is charged: ask the engine for its usage, whatever the client
            client_usage = _asked_usage(body)
            if not client_usage:
                body["stream_options"] = {**(body.get("stream_options") or {}),
                                          "include_usage": True}  # fmt: skip
        for n, c in enumerate(choice.ordered):
            body["model"] = c.deployment
            router.in_flight[c.key] += 1
            try:
                upstream, data = await self._open(c, path, orjson.dumps(body), stream)
            except _Failed as failed:
                router.in_flight[c.key] -= 1
                fallbacks.append(f"{c.key} ({failed.why})")
                continue
            except BaseException:  # cancelled (the router stopping): counted out all the same
                router.in_flight[c.key] -= 1
                raise
            reason = choice.reason
            if fallbacks:
                reason += f"; after {', '.join(fallbacks)}"
            if escalated:
                reason += f"; escalated from {', '.join(escalated)}"
            out = {
                **headers,
                "X-Wattops-Served-By": f"{c.key}@{c.precision}",
                "X-Wattops-Decision": reason,
            }
            for name in _PASSED_HEADERS:
                if name in upstream.headers:
                    out[name] = upstream.headers[name]
            if data is None:  # an event stream, relayed as it comes
                relay = _Relay(self, route, choice, c, reference, upstream, fallbacks, reason,
                               ticket, client_usage, body)  # fmt: skip
                return _RelayResponse(relay.chunks(), relay.finish,
                                      media_type=upstream.content_type or "text/event-stream",
                                      headers={**out, "Cache-Control": "no-cache"})  # fmt: skip
            router.in_flight[c.key] -= 1
            usage = _usage_of(data) if upstream.status == 200 else None
            if cascade is not None and upstream.status == 200:
                confidence = _confidence(data)
                if confidence is not None:
                    out["X-Wattops-Confidence"] = f"{confidence:.3f}"
                last = n == len(choice.ordered) - 1
                if confidence is not None and confidence < cascade and not last:
                    # Not confident enough: the next candidate answers. What this answer cost
                    # is counted all the same (it was computed).
                    escalated.append(f"{c.key} (confidence {confidence:.2f} < {cascade:g})")
                    router.record_escalation(route, c, reference, usage, ticket)
                    set_aside = (c, out, data, upstream.headers.get("Content-Type", _JSON))
                    continue
                if asked_logprobs is None:
                    data = _without_logprobs(data)
            hit = upstream.headers.get("X-Cache", "").lower() == "hit"
            await router.record(route, choice, c, reference, usage, upstream.status, fallbacks,
                                reason, ticket, hit)  # fmt: skip
            return Response(data, status_code=upstream.status, headers=out,
                            media_type=upstream.headers.get("Content-Type", _JSON))  # fmt: skip
        if set_aside is not None:
            # Every surer candidate failed: the answer set aside is still an answer. Its cost
            # is already counted (as an escalation); it is recorded as served, without usage.
            c, out, data, content_type = set_aside
            reason = (
                f"{choice.reason}; escalated from {', '.join(escalated)}; after "
                f"{', '.join(fallbacks)}; kept: every surer candidate failed"
            )
            out["X-Wattops-Decision"] = reason
            if asked_logprobs is None:
                data = _without_logprobs(data)
            await router.record(route, choice, c, reference, None, 200, fallbacks, reason, ticket)
            return Response(data, status_code=200, headers=out, media_type=content_type)
        message = "every candidate failed before its answer reached the client: " + "; ".join(
            fallbacks
        )
        await router.record(route, choice, None, reference, None, 502, fallbacks, message, ticket)
        return _error(502, message, "all_candidates_failed", headers=headers)

    async def _open(self, c: Candidate, path: str, raw: bytes,
                    stream: bool) -> tuple[aiohttp.ClientResponse, bytes | None]:  # fmt: skip
        """The candidate's response and, unless it is an event stream (`stream` and 200, left
        to be relayed), its whole body, the connection released. _Failed when it failed before
        anything could reach the client: refused, timed out, a 5xx, or an unstreamed answer
        broken off after its headers (an agent killed mid-write). The circuit breaker counts
        each of them."""
        breaker = await self.router.breaker(c.key)
        try:
            async with breaker:
                what = ""
                try:
                    upstream = await self.session.post(
                        c.url + path, data=raw, headers={"Content-Type": _JSON},
                        timeout=self.timeout,
                    )  # fmt: skip
                    if stream and upstream.status == 200:
                        return upstream, None
                    what = "broke off its answer: "  # if the body does not come whole
                    try:
                        data = await upstream.read()
                    finally:
                        upstream.release()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise _Failed(what + (str(exc) or type(exc).__name__)) from None
                if upstream.status >= 500:
                    text = data[:300].decode("utf-8", "replace")
                    raise _Failed(f"HTTP {upstream.status}: {text}")
                return upstream, data
        except OpenedState:
            raise _Failed("circuit open") from None


class _Relay:
    """One streamed answer on its way through, read event by event; records (and charges) it
    once, however it ends.

    The router asked the engine for the usage chunk (OpenAI's `stream_options.include_usage`)
    whether or not the client did: it is taken for the ledger and, unless the client asked for
    it, left out of what the client gets. A stream that ended with `data: [DONE]` was answered
    (200), whenever the client hung up after it. One the client broke off first (499, as
    nginx logs a client that closed the request) is charged what was generated: the engine's
    usage if it came, else its prompt's upper bound (what was reserved for it) and one token
    per content event relayed (llama.cpp and vLLM send one token an event). One the engine
    broke off (no `[DONE]`) is a 502, charged the same way.
    """

    def __init__(self, gateway: RouterGateway, route: str | None, choice: Choice, c: Candidate,
                 reference: Candidate | None, upstream: aiohttp.ClientResponse,
                 fallbacks: list[str], reason: str, ticket: Ticket | None,
                 client_usage: bool = True, body: dict[str, Any] | None = None
                 ) -> None:  # fmt: skip
        self.gateway, self.route, self.choice, self.c = gateway, route, choice, c
        self.ticket = ticket
        self.reference, self.upstream = reference, upstream
        self.fallbacks, self.reason = fallbacks, reason
        self.client_usage, self.body = client_usage, body or {}
        self.usage: Usage | None = None
        #: Content events relayed (each one token, for the engines we know).
        self.events = 0
        self.done = False  # `data: [DONE]` relayed
        self.broken = False  # the engine's stream ended or failed without it
        self.finished = False

    async def chunks(self) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for piece in self.upstream.content.iter_any():
                pending += piece
                # Relayed up to the last whole event (SSE ends one with a blank line, LF or CRLF).
                lf, crlf = pending.rfind(b"\n\n"), pending.rfind(b"\r\n\r\n")
                if lf < 0 and crlf < 0:
                    continue
                cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
                events, pending = pending[:cut], pending[cut:]
                out = self._read(events)
                if out:
                    yield out
            if pending:
                out = self._read(pending)
                if out:
                    yield out
        except (aiohttp.ClientError, TimeoutError):
            self.broken = True
            return
        if not self.done:
            self.broken = True

    def _read(self, events: bytes) -> bytes:
        """Note what `events` (whole SSE events) say, and return what the client gets."""
        if b'"usage"' not in events and b"[DONE]" not in events:
            self.events += events.count(b'"content":"') + events.count(b'"text":"')
            return events
        kept = []
        for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not event.strip():
                continue
            data = event[5:].strip() if event.startswith(b"data:") else b""
            if data == b"[DONE]":
                self.done = True
            elif b'"usage"' in data:
                event = self._usage_event(data, event)
                if not event:
                    continue
            else:
                self.events += event.count(b'"content":"') + event.count(b'"text":"')
            kept.append(event)
        return b"".join(e + b"\n\n" for e in kept)

    def _usage_event(self, data: bytes, event: bytes) -> bytes:
        """Take the usage from an event; the event as the client gets it (b"" for none)."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        usage = _usage_of(data)
        if usage is not None and usage.total:
            self.usage = usage
        if self.client_usage or not isinstance(chunk, dict):
            return event
        if not chunk.get("choices"):
            return b""  # the usage chunk the router asked for: not the client's
        chunk.pop("usage", None)  # an engine that puts it on a content chunk
        self.events += sum(
            1 for c in chunk["choices"]
            if isinstance(c, dict) and ((c.get("delta") or {}).get("content") or c.get("text"))
        )  # fmt: skip
        return b"data: " + orjson.dumps(chunk)

    def charged(self) -> Usage | None:
        """What the answer is charged: the engine's usage, or what was relayed."""
        if self.usage is not None:
            return self.usage
        if self.events:  # the prompt's upper bound, as its reservation counted it
            cfg = self.gateway.router.config.router
            return Usage(worst_tokens(self.body, cfg.default_max_tokens)[0], self.events)
        return None

    async def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.upstream.release()
        router = self.gateway.router
        router.in_flight[self.c.key] -= 1
        status = 200 if self.done else 502 if self.broken else CLIENT_CLOSED
        hit = self.upstream.headers.get("X-Cache", "").lower() == "hit"
        await router.record(self.route, self.choice, self.c, self.reference, self.charged(),
                            status, self.fallbacks, self.reason, self.ticket, hit)  # fmt: skip


#: What a relayed stream runs when it ends (its ledger row, its statistics).
Closing = Coroutine[Any, Any, None]


class _RelayResponse(StreamingResponse):
    """Runs `on_close` however the response ends (see the agent's gateway for why)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Closing],
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: the row is written (and the statistics kept) however this ends.
            await asyncio.shield(self._on_close())
