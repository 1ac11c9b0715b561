"""The router's ASGI app: the OpenAI paths go straight to the proxy (`proxy.py`); the rest is
a small FastAPI app, OpenAPI-documented at /docs: `GET /v1/router` (routes, their split and
savings), `PATCH /v1/routes/{name}` (change a route's policy or bounds; an operator),
`/v1/keys` and `/v1/budgets` (API keys and budgets; an admin, a viewer to read budgets and
the report), `/v1/whoami`, `/metrics` and `/healthz`. Roles: vocabulary/access.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Literal

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from wattops.router.api import (
    Bounds,
    Budget,
    BudgetPatch,
    BudgetView,
    KeyCreate,
    KeyCreated,
    KeyPatch,
    KeyView,
    LedgerCheck,
    Report,
    RoutePatch,
    RouterView,
)
from wattops.router.billing.admission import BudgetBook, ring
from wattops.router.billing.budgets import utc_moment
from wattops.router.billing.keys import KeyRecord
from wattops.router.billing.report import build_report
from wattops.router.billing.verify import verify_at, verify_sqlite
from wattops.router.core import Router
from wattops.router.proxy import OPENAI_PATHS, RouterGateway, store_unavailable
from wattops.vocabulary.access import AccessDenied, Caller, Role, WhoAmI
from wattops.vocabulary.audit import AuditMiddleware, AuditPage
from wattops.vocabulary.hardening import Guard
from wattops.vocabulary.openai import error_body
from wattops.vocabulary.tls import peer_of

log = logging.getLogger("wattops.router")

__all__ = ["RouterASGI", "create_app"]

ROUTER_VERSION = "0.1.0"


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


#: What any endpoint may answer besides its success (OpenAI's error shape), documented once.
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": why} for status, why in (
        (400, "a bad header or body value, named"),
        (401, "no bearer token, and the endpoint needs one"),
        (403, "the token's role is below the one needed, or the token is unknown"),
        (404, "no such route, key or budget"),
        (405, "method not allowed (see `Allow`)"),
        (408, "the body did not arrive in time"),
        (409, "it exists already"),
        (413, "the body is too large"),
        (422, "a field is missing, of the wrong type or out of range"),
        (429, "too many event streams from this client"),
        (431, "the headers are too large"),
        (503, "the store (keys, budgets, ledger) cannot be reached"),
    )
}  # fmt: skip


def create_app(router: Router) -> FastAPI:
    app = FastAPI(
        title="wattops-router",
        version=ROUTER_VERSION,
        description="One OpenAI endpoint for the fleet: each request to the deployment that "
        "meets its route's quality and latency bounds at the lowest cost, energy or carbon.",
        responses=_ERRORS,
    )

    access = router.access

    def require(role: Role, what: str, reads: bool = False,
                never_open: bool = False) -> Callable[[Request], Caller]:  # fmt: skip
        """A dependency: the caller, if its token's role allows `what` (vocabulary/access.py).
        `reads`: only when `reads = "viewer"`; `never_open`: refused when no token is
        configured at all (keys and budgets decide who may spend what)."""

        def check(request: Request) -> Caller:
            if never_open and access.open:
                raise HTTPException(
                    403, f"{what} needs a token: add [[tokens]] (or set [router] token or "
                    "$WATTOPS_TOKEN) and send it as a bearer token",
                )  # fmt: skip
            if reads and router.config.router.reads == "open":
                return Caller("anonymous", "viewer")
            try:
                caller = access.check(request.headers.get("authorization"), role, what,
                                      peer_of(request.scope))  # fmt: skip
            except AccessDenied as exc:
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                raise HTTPException(exc.status, str(exc), headers=headers) from None
            request.state.caller = caller
            return caller

        return check

    reader = [Depends(require("viewer", "reading the router", reads=True))]
    operator = [Depends(require("operator", "changing a route"))]

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed"}.get(exc.status_code, "http_error")  # fmt: skip
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Every method of the path (Starlette names only the first route's).
            allowed = sorted({m for r in app.routes if isinstance(r, APIRoute)
                              and r.matches(request.scope)[0] is not Match.NONE
                              for m in r.methods or ()})  # fmt: skip
            headers["Allow"] = ", ".join(allowed)
        return _error(exc.status_code, code, str(exc.detail), headers)

    for error in router.charging.store_errors:

        @app.exception_handler(error)
        async def _store_down(request: Request, exc: Exception) -> Response:
            return store_unavailable(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return _error(422, "invalid_request", "; ".join(problems))

    @app.get("/healthz", tags=["router"])
    async def healthz() -> dict[str, str]:
        """Liveness: the router's event loop answers."""
        return {"status": "ok"}

    @app.get("/v1/whoami", response_model=WhoAmI, tags=["router"])
    async def whoami(request: Request) -> WhoAmI:
        """Who the bearer token (if any) names, and what its role allows here."""
        try:
            caller = access.identify(request.headers.get("authorization"), peer_of(request.scope))
        except AccessDenied as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if access.open:
            caller = Caller("anonymous", "admin")
        return WhoAmI(name=caller.name if caller else None, role=caller.role if caller else None,
                      via=caller.via if caller and not access.open else None,
                      open=access.open, reads=router.config.router.reads,
                      may_control=caller is not None and caller.may("operator"))  # fmt: skip

    @app.get("/v1/router", response_model=RouterView, tags=["router"], dependencies=reader)
    async def view() -> Response:
        """Per route: the bounds, each candidate's figures and share of the traffic, the
        estimated cost and energy against the reference's counterfactual, the last decisions."""
        return Response(router.view().model_dump_json(), media_type="application/json")

    @app.patch("/v1/routes/{name}", response_model=Bounds, tags=["router"],
               dependencies=operator)  # fmt: skip
    async def patch(name: str, change: RoutePatch) -> Bounds:
        """Change a route's policy or bounds now; kept across restarts (state_dir)."""
        if name not in router.routes:
            raise HTTPException(404, f"no route {name!r}; routes: {', '.join(router.routes)}")
        try:
            return router.patch(name, change)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    charging = router.charging

    # Keys and budgets decide who may spend what: never open, even on a router whose other
    # control endpoints are (no token configured). Reading budgets and the report: a viewer.
    admin = [Depends(require("admin", "keys and budgets", never_open=True))]
    budget_reader = [Depends(require("viewer", "budgets and reports", never_open=True))]

    def known_key(key_id: str) -> KeyRecord:
        found = charging.key_record(key_id)
        if found is None:
            raise HTTPException(404, f"no key {key_id!r}")
        return found

    @app.post("/v1/keys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED,
              tags=["keys"], dependencies=admin)  # fmt: skip
    async def create_key(asked: KeyCreate) -> KeyCreated:
        """A new API key for a team, with the budgets asked for; the key is in this answer
        only (a salted hash is kept). Once a key exists, inference needs one (unless
        `require_keys = false`)."""
        secret, view = charging.create_key(asked)
        return KeyCreated(**view.model_dump(), key=secret)

    @app.get("/v1/keys", response_model=list[KeyView], tags=["keys"], dependencies=admin)
    async def list_keys() -> list[KeyView]:
        """Every key, revoked ones included (never their secrets)."""
        return [charging.key_view(k) for k in charging.key_records()]

    @app.get("/v1/keys/{key_id}", response_model=KeyView, tags=["keys"], dependencies=admin)
    async def show_key(key_id: str) -> KeyView:
        return charging.key_view(known_key(key_id))

    @app.patch("/v1/keys/{key_id}", response_model=KeyView, tags=["keys"], dependencies=admin)
    async def update_key(key_id: str, change: KeyPatch) -> KeyView:
        return charging.update_key(known_key(key_id), change)

    @app.delete("/v1/keys/{key_id}", response_model=KeyView, tags=["keys"], dependencies=admin)
    async def revoke_key(key_id: str) -> KeyView:
        """Revoke a key: refused from the next request on; kept in the ledger's history."""
        return charging.revoke_key(known_key(key_id))

    def known_budget(name: str) -> Budget:
        budgets = charging.book.budgets
        found = budgets.get(name)
        if found is None:
            raise HTTPException(404, f"no budget {name!r}; budgets: "
                                f"{', '.join(budgets) or 'none'}")  # fmt: skip
        return found

    @app.get("/v1/budgets", response_model=list[BudgetView], tags=["budgets"],
             dependencies=budget_reader)  # fmt: skip
    async def list_budgets() -> list[BudgetView]:
        """Every budget and where it stands in its current window."""
        return await charging.abudget_views()

    @app.post("/v1/budgets", response_model=BudgetView, status_code=status.HTTP_201_CREATED,
              tags=["budgets"], dependencies=admin)  # fmt: skip
    async def create_budget(
        budget: Budget,
        response: Response,
        force: bool = Query(
            False,
            description="make it though its key, team or route is not "
            "known yet (a team before its first key, say); with a warning",
        ),
    ) -> BudgetView:
        """Make a budget. One on a key, team or route that does not exist would hold nothing
        back, silently: it is refused, naming what exists, unless `force` is given."""
        if budget.name in charging.book.budgets:
            raise HTTPException(409, f"budget {budget.name!r} exists: PATCH it, or DELETE it")
        unknown = unknown_subject(budget)
        if unknown and not force:
            raise HTTPException(422, f"{unknown}: a budget on it would cover no request; "
                                "pass force=true (wattops budgets create --force) to make it "
                                "all the same")  # fmt: skip
        if unknown:
            log.warning("budget %s made with force: %s", budget.name, unknown)
            response.headers["X-Wattops-Warning"] = unknown
        charging.book.put(budget)
        return charging.budget_view(charging.book.standing(budget))

    def unknown_subject(budget: Budget) -> str | None:
        """What is wrong with the budget's subject, or None if it exists."""
        if budget.scope == "key" and charging.key_record(str(budget.subject)) is None:
            ids = [k.id for k in charging.key_records()]
            return f"no key {budget.subject!r} (keys: {', '.join(ids) or 'none'})"
        if budget.scope == "team":
            teams = sorted({k.team for k in charging.key_records()})
            if budget.subject not in teams:
                return (f"no key has team {budget.subject!r} (teams: "
                        f"{', '.join(teams) or 'none'})")  # fmt: skip
        if budget.scope == "route" and budget.subject not in router.routes:
            return (f"no route {budget.subject!r} (routes: "
                    f"{', '.join(router.routes) or 'none'})")  # fmt: skip
        return None

    @app.patch("/v1/budgets/{name}", response_model=BudgetView, tags=["budgets"],
               dependencies=admin)  # fmt: skip
    async def patch_budget(name: str, change: BudgetPatch) -> BudgetView:
        """Raise or lower a budget, or change its degrade and warning thresholds, now."""
        budget = known_budget(name)
        try:
            changed = Budget.model_validate(
                {**budget.model_dump(), **change.model_dump(exclude_unset=True)}
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        was_over = charging.book.standing(budget).over
        charging.book.put(changed)
        now = charging.book.standing(changed)
        # A limit lowered below the spend: the warnings it passes fire now (not at the next
        # answer, which it may refuse), and the refusals it starts are said, with their end.
        ring(charging.book, now)
        if now.over and not was_over:
            log.warning("budget %s lowered to %g %s, at or below its %g spent and reserved: "
                        "requests it covers are refused until %s", changed.name,
                        changed.limit, changed.unit, now.used,
                        utc_moment(now.resets_at))  # fmt: skip
        return charging.budget_view(now)

    @app.delete("/v1/budgets/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["budgets"],
                dependencies=admin)  # fmt: skip
    async def delete_budget(name: str) -> Response:
        known_budget(name)
        charging.book.delete(name)
        return Response(status_code=204)

    @app.get("/v1/report", response_model=Report, tags=["budgets"], dependencies=budget_reader)
    async def report(
        by: Literal["key", "team", "route"] = "team",
        since: float = Query(description="unix time the period begins"),
        until: float | None = Query(None, description="unix time it ends; default: now"),
    ) -> Report:
        """Chargeback per key, team or route from the ledger, the fleet's attributed totals
        and what no request was charged (router/billing/report.py), and each budget's forecast."""
        if until is not None and until <= since:
            raise HTTPException(422, f"the period ends ({until:.0f}) before it begins "
                                f"({since:.0f}): `until` must be after `since`")  # fmt: skip
        if isinstance(charging.book, BudgetBook):  # local reads; its windows are this loop's
            return build_report(charging.book, by, since, until)
        # Redis: the ledger stream is read by pages, in a thread (never on the event loop).
        return await asyncio.to_thread(build_report, charging.book, by, since, until)

    @app.get("/v1/ledger/verify", response_model=LedgerCheck, tags=["budgets"],
             dependencies=budget_reader)  # fmt: skip
    async def verify_ledger() -> LedgerCheck:
        """The ledger re-added row by row: its hash chain, each budget's spend per window
        against what the router counts, reservations against the requests in flight, the
        report's sums (router/billing/verify.py). Read in a thread, from a snapshot."""
        book = charging.book
        if isinstance(book, BudgetBook):
            live = book.live()  # on the event loop: between two settles
            return await asyncio.to_thread(verify_sqlite, book.ledger.path, live)
        section = router.config.router
        return await asyncio.to_thread(verify_at, None, section.store, section.store_prefix)

    @app.get("/v1/audit", response_model=AuditPage, tags=["router"], dependencies=operator)
    async def audit(
        since: float = Query(0.0, ge=0, description="unix time: entries from then on"),
        limit: int = Query(1000, ge=1, le=10000, description="the last N entries"),
    ) -> AuditPage:
        """The audit log: every control call, allowed or refused (operators and admins)."""
        entries, torn = router.audit.read(since, limit)
        return AuditPage(entries=entries, torn_lines=torn)

    @app.get("/metrics", tags=["router"], dependencies=reader, response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics (`wattops_route_*`, `wattops_budget_*`, `wattops_router_store_*`)."""
        try:
            await charging.abudget_views()  # the budget gauges read these
            charging.store_ok()
        except charging.store_errors as exc:
            charging.last_views = []  # the store is out: `wattops_router_store_up` says so
            charging.store_error(exc)
        return Response(generate_latest(router.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class RouterASGI:
    """The OpenAI paths first (no FastAPI machinery on the hot path), then the API."""

    def __init__(self, gateway: RouterGateway, api: FastAPI) -> None:
        self.gateway = gateway
        router = gateway.router
        # Every control call, allowed or refused, in the router's audit log (reads are not).
        audited = AuditMiddleware(
            api, router.audit, "router", lambda scope, auth: router.access.name_of(scope, auth)
        )
        # Header, body and slow-client limits (vocabulary/hardening.py), in OpenAI's shape.
        self.api = Guard(audited, error=lambda status, code, message: orjson.dumps(
            error_body(status, message, code)))  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in OPENAI_PATHS:
            await self.gateway(scope, receive, send)
        else:
            await self.api(scope, receive, send)
