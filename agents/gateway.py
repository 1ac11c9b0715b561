"""The OpenAI-compatible gateway: the agent's hot path.

Routes a request by its `model` (the deployment name) to the ready replica with the fewest
requests in flight, answers deterministic requests from the response cache, streams SSE
through chunk by chunk, and retries once on another replica when one fails before its
answer reaches the client (before its first byte, or mid-body for an unstreamed answer).
Forwarding uses one aiohttp ClientSession: measured here, httpx's client was several times
slower on this path (see docs/benchmarks.md). The gateway is a plain ASGI app
that the agent mounts in front of FastAPI, so inference requests skip FastAPI's middleware
and dependency machinery entirely.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from wattops.agents import openai_rules
from wattops.agents.response_cache import CachedAnswer, ResponseCache, cache_key, is_cacheable
from wattops.agents.supervisor import Deployment, LiveReplica, NoReplicaError
from wattops.vocabulary.openai import MAX_BODY_BYTES, BodyTooLarge, error_body, read_body

log = logging.getLogger("wattops.agent")

_JSON = "application/json"
_UPSTREAM_HEADERS = {"Content-Type": _JSON}
#: Paths the gateway serves; everything else goes to the FastAPI control/read API.
CHAT_PATH = "/v1/chat/completions"
GATEWAY_PATHS = frozenset({"/v1/models", CHAT_PATH, "/v1/completions"})
# Failures before anything reached the client (an unstreamed body is read whole before it is
# sent): safe to ask again elsewhere.
_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


def openai_error(status: int, message: str, code: str, param: str | None = None) -> Response:
    """An error in OpenAI's shape, which OpenAI client libraries know how to show."""
    return Response(
        orjson.dumps(error_body(status, message, code, param)),
        status_code=status,
        media_type=_JSON,
        headers={"X-Cache": "miss"},
    )


class Gateway:
    """Serves /v1/chat/completions, /v1/completions and /v1/models for all deployments."""

    def __init__(
        self,
        deployments: Mapping[str, Deployment],
        session: aiohttp.ClientSession,
        cache: ResponseCache | None,
        wake_timeout_s: float,
        request_timeout_s: float,
    ) -> None:
        self.deployments = deployments
        self.session = session
        self.cache = cache
        self.wake_timeout_s = wake_timeout_s
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point for the paths in GATEWAY_PATHS."""
        path, method = scope["path"], scope["method"]
        if path == "/v1/models":
            response = self.models() if method in ("GET", "HEAD") else _not_allowed("GET")
        elif method != "POST":
            response = _not_allowed("POST")
        else:
            try:
                raw = await read_body(receive)
            except BodyTooLarge:
                raw = None
                response = openai_error(
                    413, f"the body is over {MAX_BODY_BYTES} bytes", "body_too_large"
                )
            else:
                if raw is None:
                    return  # the client went away before sending its request
                response = await self._handle(raw, path)
        await response(scope, receive, send)

    def models(self) -> Response:
        """GET /v1/models: one model per deployment."""
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "wattops"}
            for name in self.deployments
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=_JSON)

    async def _handle(self, raw: bytes, endpoint: str) -> Response:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return openai_error(400, f"the body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(body, dict):
            return openai_error(400, "the body must be a JSON object", "invalid_body")
        try:
            openai_rules.check(body, chat=endpoint == CHAT_PATH)
        except openai_rules.InvalidRequest as exc:
            return openai_error(400, str(exc), "invalid_value", exc.param)
        name = body["model"]
        deployment = self.deployments.get(name)
        if deployment is None:
            return openai_error(
                404,
                f"model {name!r} is not served here; available: "
                f"{', '.join(self.deployments) or 'none'}",
                "model_not_found",
                "model",
            )
        key = None
        if self.cache is not None and is_cacheable(body):
            key = cache_key(deployment.name, deployment.precision, endpoint, body,
                            deployment.engine.identity)  # fmt: skip
            hit = self.cache.get(key)
            if hit is not None:
                deployment.record_cache(hit=True)
                return Response(hit.body, media_type=hit.content_type, headers=_HIT_HEADERS)
            deployment.record_cache(hit=False)
        return await self._forward(deployment, endpoint, raw, body, key)

    async def _forward(
        self,
        deployment: Deployment,
        endpoint: str,
        raw: bytes,
        body: dict[str, Any],
        key: str | None,
    ) -> Response:
        started = time.perf_counter()
        failed: LiveReplica | None = None
        streamed = bool(body.get("stream"))
        for attempt in (1, 2):
            try:
                replica = await deployment.acquire(self.wake_timeout_s, exclude=failed)
            except NoReplicaError as exc:
                deployment.count_failure()
                return openai_error(503, str(exc), "no_replica")
            data: bytes | None = None
            what = "failed before answering"
            try:
                upstream = await self.session.post(
                    replica.replica.url + endpoint,
                    data=raw,
                    headers=_UPSTREAM_HEADERS,
                    timeout=self.timeout,
                )
                if not (streamed and upstream.status == 200):
                    what = "broke off its answer"  # if the body does not come whole
                    try:  # an unstreamed answer is read whole here: nothing is sent yet
                        data = await upstream.read()
                    finally:
                        upstream.release()
            except _RETRYABLE as exc:
                # Nothing reached the client: refused, reset, or an unstreamed answer broken
                # off after its headers (a replica killed mid-write). Ask again elsewhere;
                # with a single replica, on the same one (the error may have been the
                # connection, not the replica) rather than wait for another.
                deployment.replica_failed(replica)
                failed = replica if len(deployment.ready) > 1 else None
                log.warning(
                    "%s: replica %s %s (%s: %s); %s",
                    deployment.name, replica.replica.id, what, type(exc).__name__, exc,
                    "answered 502" if attempt == 2 else "trying again",
                )  # fmt: skip
                if attempt == 2:
                    deployment.count_failure()
                    why = str(exc) or type(exc).__name__
                    return openai_error(
                        502, f"replica {replica.replica.id} {what}: {why}", "upstream_failed"
                    )
                continue
            except TimeoutError:  # the engine is slow, not gone: not asked again
                log.warning("%s: replica %s did not answer in time; answered 504",
                            deployment.name, replica.replica.id)  # fmt: skip
                deployment.release(replica, None, error=True)
                return openai_error(504, "the engine did not answer in time", "upstream_timeout")
            if data is None:
                relay = _Relay(self, deployment, replica, upstream, started, key, endpoint, body)
                return _RelayResponse(
                    relay.chunks(),
                    relay.finish,
                    media_type=upstream.content_type or "text/event-stream",
                    headers={"X-Cache": "miss", "Cache-Control": "no-cache"},
                )
            ok = upstream.status == 200
            deployment.release(replica, time.perf_counter() - started, error=not ok)
            if ok and deployment.canary is not None:
                deployment.shadow(endpoint, body)
            content_type = upstream.headers.get("Content-Type", _JSON)
            if ok and key is not None and self.cache is not None:
                self.cache.put(_store_key(key, replica), CachedAnswer(content_type, data))
            headers = {"Content-Type": content_type, "X-Cache": "miss"}
            if ok and deployment.per_token is not None:
                _estimate_headers(headers, deployment.per_token, data)
            return Response(data, status_code=upstream.status, media_type=None, headers=headers)
        raise AssertionError("unreachable")


class _Relay:
    """One streamed answer on its way through: relays the chunks, then frees the replica
    slot and the upstream connection exactly once, however the stream ends."""

    def __init__(
        self,
        gateway: Gateway,
        deployment: Deployment,
        replica: LiveReplica,
        upstream: aiohttp.ClientResponse,
        started: float,
        key: str | None,
        endpoint: str,
        body: dict[str, Any],
    ) -> None:
        self.gateway = gateway
        self.endpoint = endpoint
        self.body = body
        self.deployment = deployment
        self.replica = replica
        self.upstream = upstream
        self.started = started
        self.key = key
        self.kept: list[bytes] | None = [] if key is not None else None
        self.complete = False
        self.finished = False
        #: Seconds to the first chunk (the time to first token a streaming client sees).
        self.ttft_s: float | None = None
        #: The answer's tokens, from the engine's usage chunk when the stream carries one.
        self.tokens: int | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The upstream's chunks as they come."""
        tail = b""
        async for chunk in self.upstream.content.iter_any():
            if self.ttft_s is None:
                self.ttft_s = time.perf_counter() - self.started
            if self.kept is not None:
                self.kept.append(chunk)
            if b'"total_tokens"' in chunk:
                found = _TOTAL_TOKENS.search(chunk)
                if found:
                    self.tokens = int(found.group(1))
            tail = (tail + chunk)[-32:]
            if not self.complete and tail.rstrip().endswith(b"data: [DONE]"):
                # Whole: answered (not an error) and cached before its last bytes go out, so
                # a client that hangs up the moment it has them changes neither, and one that
                # repeats the request at once gets a hit.
                self.complete = True
                self._store()
                chunk = self._estimated(chunk)
            yield chunk
        if not self.complete:
            self.complete = True  # the engine ended the stream (without [DONE]: not cached)
            self._store()

    def finish(self) -> None:
        """Release everything. Idempotent."""
        if self.finished:
            return
        self.finished = True
        self.upstream.release()
        self.deployment.release(
            self.replica, time.perf_counter() - self.started, error=not self.complete,
            ttft_s=self.ttft_s,
        )  # fmt: skip
        if self.complete and self.deployment.canary is not None:
            self.deployment.shadow(self.endpoint, self.body)

    def _estimated(self, chunk: bytes) -> bytes:
        """The chunk with `[DONE]`, an SSE comment before it giving the answer's estimated
        energy and cost (the `X-Wattops-Est-*` headers of an unstreamed answer: a stream's
        headers leave before its tokens exist). Comments are ignored by SSE clients (the
        `openai` SDK's included). Only from the engine's own usage (`stream_options.
        include_usage`, which the router always asks for): without it, no line."""
        per_token = self.deployment.per_token
        at = chunk.rfind(b"data: [DONE]")
        if per_token is None or self.tokens is None or at < 0:
            return chunk
        joules, usd = per_token
        line = (
            f": wattops est_energy_j={joules * self.tokens:.6g} "
            f"est_cost_usd={usd * self.tokens:.6g} tokens={self.tokens}\n\n"
        ).encode()
        return chunk[:at] + line + chunk[at:]

    def _store(self) -> None:
        """Cache the answer if it ended properly."""
        cache = self.gateway.cache
        if self.kept is not None and cache is not None and self.key:
            body = b"".join(self.kept)
            # An engine that failed mid-stream sends no [DONE]: never replay that.
            if body.rstrip().endswith(b"data: [DONE]"):
                content_type = self.upstream.content_type or "text/event-stream"
                cache.put(_store_key(self.key, self.replica), CachedAnswer(content_type, body))


class _RelayResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends: Starlette may cancel it
    before the body generator has started (client gone), and then the generator's own
    `finally` never runs."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None],
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


#: The total of an engine's usage chunk.
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')

#: A cache hit runs no engine: its marginal energy and cost are taken as zero.
_HIT_HEADERS = {"X-Cache": "hit", "X-Wattops-Est-Energy-J": "0", "X-Wattops-Est-Cost-USD": "0"}


def _estimate_headers(headers: dict[str, str], per_token: tuple[float, float], body: bytes) -> None:
    # The answer's tokens times the deployment's recent joules and dollars per token: an
    # estimate by construction (the engine does not meter single requests), named as such.
    try:
        usage = orjson.loads(body).get("usage") or {}
        tokens = int(usage.get("total_tokens") or 0)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return
    joules, usd = per_token
    headers["X-Wattops-Est-Energy-J"] = f"{joules * tokens:.6g}"
    headers["X-Wattops-Est-Cost-USD"] = f"{usd * tokens:.6g}"


def _not_allowed(allowed: str) -> Response:
    body = {
        "error": {
            "message": f"method not allowed; use {allowed}",
            "type": "invalid_request_error",
            "param": None,
            "code": "method_not_allowed",
        }
    }
    return Response(
        orjson.dumps(body), status_code=405, media_type=_JSON, headers={"Allow": allowed}
    )


def _store_key(key: str, replica: LiveReplica) -> str:
    # The lookup used the deployment's precision at arrival; store under the precision of
    # the replica that actually answered (they differ only during a switch).
    name, precision, rest = key.split("|", 2)
    if precision == replica.replica.precision:
        return key
    return f"{name}|{replica.replica.precision}|{rest}"
