"""The agent's HTTP API (FastAPI): node snapshot, events, control, and the gateway routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from wattops.agents.api import (
    Accepted,
    ErrorBody,
    History,
    NodeSnapshot,
    PolicyRequest,
    PolicyStatus,
    PrecisionRequest,
    ScaleRequest,
)
from wattops.agents.gateway import GATEWAY_PATHS
from wattops.agents.metrics import registry_for
from wattops.agents.node import AGENT_VERSION, NodeAgent
from wattops.agents.supervisor import ControlError, Deployment
from wattops.vocabulary.access import AccessDenied, Caller, Role, WhoAmI
from wattops.vocabulary.audit import AuditMiddleware, AuditPage
from wattops.vocabulary.hardening import Guard
from wattops.vocabulary.tls import peer_of

log = logging.getLogger("wattops.agent")

#: Minimum gap between two snapshot events on one stream: changes in between are coalesced.
EVENT_MIN_INTERVAL_S = 0.25


class APIError(Exception):
    """An error answered with an ErrorBody."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        allowed: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=code, message=message, allowed=allowed)
        self.headers = headers


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        exc.body.model_dump(exclude_none=True), status_code=exc.status, headers=exc.headers
    )


def get_agent(request: Request) -> NodeAgent:
    """The NodeAgent this app serves."""
    agent: NodeAgent = request.app.state.agent
    return agent


AgentDep = Annotated[NodeAgent, Depends(get_agent)]


def get_deployment(name: str, agent: AgentDep) -> Deployment:
    """The deployment named in the path; 404 listing the deployments if there is none."""
    found = agent.deployments.get(name)
    if found is None:
        raise APIError(
            404,
            "unknown_deployment",
            f"no deployment named {name!r} on this node",
            sorted(agent.deployments),
        )
    return found


def _require(role: Role, what: str, reads: bool = False) -> Callable[..., Caller]:
    """A dependency: the caller, if its token's role allows `what` (vocabulary/access.py);
    401 without a token, 403 naming the role needed and the one held. `reads`: only when the
    agent's `reads = "viewer"` (otherwise reads stay open)."""

    def check(request: Request, agent: AgentDep) -> Caller:
        if reads and agent.config.agent.reads == "open":
            return ANONYMOUS_VIEWER
        try:
            caller = agent.access.check(request.headers.get("authorization"), role, what,
                                        peer_of(request.scope))  # fmt: skip
        except AccessDenied as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            raise APIError(exc.status, exc.code, str(exc), headers=headers) from None
        request.state.caller = caller
        return caller

    return check


ANONYMOUS_VIEWER = Caller("anonymous", "viewer")
DeploymentDep = Annotated[Deployment, Depends(get_deployment)]
OperatorAuth = Depends(_require("operator", "control endpoints"))
ReadAuth = Depends(_require("viewer", "reading the node", reads=True))


class AgentASGI:
    """The agent's ASGI app: the gateway's hot paths first, then the FastAPI API.

    Inference requests go straight to the gateway, skipping FastAPI's middleware and
    dependency resolution (measured: about a third of the gateway's CPU per request).
    """

    def __init__(self, agent: NodeAgent, api: Callable[[Scope, Receive, Send], Awaitable[None]]
                 ) -> None:  # fmt: skip
        self.agent = agent
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GATEWAY_PATHS:
            gateway = self.agent.gateway
            assert gateway is not None, "the agent must be started before it serves"
            await gateway(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_asgi(agent: NodeAgent) -> AgentASGI:
    """The ASGI app that `wattops-agent` serves: the gateway, then the API behind its audit
    log (every control call, allowed or refused)."""

    def figures(path: str) -> dict[str, Any] | None:
        parts = path.strip("/").split("/")
        dep = (
            agent.deployments.get(parts[2])
            if len(parts) > 2 and parts[1] == "deployments"
            else None
        )
        if dep is None:
            return None
        usd = agent.accounting.deployment_usd_per_hour(dep.name) if agent.accounting else None
        return {"deployment": dep.name, "precision": dep.precision,
                "desired_precision": dep.desired.precision, "ready_replicas": len(dep.ready),
                "desired_replicas": dep.desired.replicas, "usd_per_hour": usd}  # fmt: skip

    api = AuditMiddleware(create_app(agent), agent.audit, "agent",
                          lambda scope, auth: agent.access.name_of(scope, auth),
                          figures)  # fmt: skip
    return AgentASGI(agent, Guard(api))  # header, body, slow-client and stream limits


def create_app(agent: NodeAgent) -> FastAPI:
    """Build the FastAPI application around a NodeAgent that the caller starts and stops."""

    app = FastAPI(
        title="wattops-agent",
        version=AGENT_VERSION,
        description="Node agent: OpenAI-compatible gateway, replica control, node snapshot.",
        responses={
            400: {"model": ErrorBody, "description": "the body is not valid JSON"},
            404: {"model": ErrorBody, "description": "no such deployment or path"},
            405: {"model": ErrorBody, "description": "method not allowed (see `Allow`)"},
            422: {
                "model": ErrorBody,
                "description": "a field is missing, of the wrong type or out of range",
            },
        },
    )
    app.state.agent = agent

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        status = 422
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                status = 400
                at = next((p for p in err.get("loc", ()) if isinstance(p, int)), None)
                where = f" (at character {at})" if at is not None else ""
                reason = (err.get("ctx") or {}).get("error", err.get("msg"))
                problems.append(f"the body is not valid JSON{where}: {reason}")
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{loc}: {err.get('msg')}")
        code = "invalid_json" if status == 400 else "invalid_request"
        return _error_response(APIError(status, code, "; ".join(problems)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The exception's headers carry e.g. `Allow` on a 405: kept.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(
            APIError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))
        )

    @app.get("/healthz", tags=["node"])
    async def healthz() -> dict[str, str]:
        """Liveness: the agent's event loop answers."""
        return {"status": "ok"}

    @app.get("/v1/whoami", response_model=WhoAmI, tags=["node"],
             responses={403: {"model": ErrorBody}})  # fmt: skip
    async def whoami(request: Request, agent: AgentDep) -> WhoAmI:
        """Who the bearer token (if any) names, and what its role allows here: the console
        and the CLI disable what it does not."""
        access = agent.access
        try:
            caller = access.identify(request.headers.get("authorization"), peer_of(request.scope))
        except AccessDenied as exc:
            raise APIError(exc.status, exc.code, str(exc)) from None
        if access.open:
            caller = Caller("anonymous", "admin")
        return WhoAmI(name=caller.name if caller else None, role=caller.role if caller else None,
                      via=caller.via if caller and not access.open else None,
                      open=access.open, reads=agent.config.agent.reads,
                      may_control=caller is not None and caller.may("operator"))  # fmt: skip

    @app.get("/v1/node", response_model=NodeSnapshot, tags=["node"],
             dependencies=[ReadAuth])  # fmt: skip
    async def node(agent: AgentDep) -> Response:
        """The node snapshot: every deployment's desired and actual state and counters."""
        return Response(agent.snapshot().model_dump_json(), media_type="application/json")

    @app.get("/v1/events", tags=["node"], response_class=EventSourceResponse,
             dependencies=[ReadAuth])  # fmt: skip
    async def events(agent: AgentDep) -> EventSourceResponse:
        """The node snapshot as server-sent events (`event: snapshot`), sent on change."""

        async def stream() -> AsyncIterator[dict[str, Any]]:
            seen = -1
            while True:
                if agent.version <= seen:
                    await agent.wait_changed(seen)
                snap = agent.snapshot()
                seen = snap.version
                yield {"event": "snapshot", "id": str(seen), "data": snap.model_dump_json()}
                await asyncio.sleep(EVENT_MIN_INTERVAL_S)

        return EventSourceResponse(stream(), ping=15)

    @app.get("/v1/history", response_model=History, tags=["node"], dependencies=[ReadAuth])
    async def history(
        agent: AgentDep,
        seconds: Annotated[int, Query(ge=1, le=3600, description="how far back")] = 300,
    ) -> Response:
        """The node's history at 1 s resolution, up to the last hour (oldest first)."""
        assert agent.accounting is not None
        body = History(node=agent.config.agent.node, resolution_s=1.0,
                       points=agent.accounting.history.since(seconds))  # fmt: skip
        return Response(body.model_dump_json(), media_type="application/json")

    metrics_registry = registry_for(agent.snapshot)

    @app.get("/metrics", tags=["node"], response_class=PlainTextResponse,
             dependencies=[ReadAuth])  # fmt: skip
    async def metrics() -> Response:
        """Prometheus text exposition of power, energy, cost, carbon, tokens and replicas."""
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/deployments/{name}/scale",
        status_code=202,
        response_model=Accepted,
        dependencies=[OperatorAuth],
        tags=["control"],
        responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
    )
    async def scale(body: ScaleRequest, deployment: DeploymentDep) -> Accepted:
        """Scale a deployment to `replicas` (0 parks it); carried out in the background."""
        try:
            deployment.set_replicas(body.replicas)
        except ControlError as exc:
            raise APIError(exc.status, exc.code, str(exc), exc.allowed) from None
        return _accepted(deployment, "scale")

    @app.post(
        "/v1/deployments/{name}/precision",
        status_code=202,
        response_model=Accepted,
        dependencies=[OperatorAuth],
        tags=["control"],
        responses={
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            409: {"model": ErrorBody},
        },
    )
    async def precision(body: PrecisionRequest, deployment: DeploymentDep,
                        agent: AgentDep) -> Accepted:  # fmt: skip
        """Switch a deployment's precision without downtime, at once or after a canary
        (`canary`: the candidate takes a share of live traffic and is promoted or rolled back
        on its guards; see the deployment's `canary` in the snapshot). In the background."""
        try:
            if body.canary is None:
                deployment.set_precision(body.precision)
            else:
                assert agent.session is not None
                cost = agent.accounting.cost if agent.accounting is not None else None
                deployment.start_canary(body.precision, body.canary, agent.session, cost)
        except ControlError as exc:
            raise APIError(exc.status, exc.code, str(exc), exc.allowed) from None
        return _accepted(deployment, "canary" if body.canary else "precision")

    @app.delete(
        "/v1/deployments/{name}/canary",
        status_code=202,
        response_model=Accepted,
        dependencies=[OperatorAuth],
        tags=["control"],
        responses={
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            404: {"model": ErrorBody},
        },
    )
    async def abort_canary(deployment: DeploymentDep) -> Accepted:
        """Abort the running canary: rolled back, the serving precision stays."""
        try:
            deployment.abort_canary()
        except ControlError as exc:
            raise APIError(exc.status, exc.code, str(exc), exc.allowed) from None
        return _accepted(deployment, "canary")

    @app.post(
        "/v1/policy",
        response_model=PolicyStatus,
        dependencies=[OperatorAuth],
        tags=["control"],
        responses={
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            409: {"model": ErrorBody},
        },
    )
    async def policy(body: PolicyRequest, agent: AgentDep) -> PolicyStatus:
        """Pause the node's policy (it keeps planning and saying, and acts on nothing) or let
        it act again."""
        if agent.config.policy.mode == "off":
            raise APIError(409, "no_policy", "this node has no [policy] (mode = off)")
        agent.policy_paused = body.paused
        log.info("policy %s by the operator", "paused" if body.paused else "resumed")
        agent.mark_changed()
        status = agent.policy_status()
        assert status is not None
        return status

    @app.get("/v1/audit", response_model=AuditPage, tags=["control"],
             dependencies=[OperatorAuth])  # fmt: skip
    async def audit(
        agent: AgentDep,
        since: Annotated[float, Query(ge=0, description="unix time: entries from then on")] = 0.0,
        limit: Annotated[int, Query(ge=1, le=10000, description="the last N entries")] = 1000,
    ) -> AuditPage:
        """The audit log: every control call, allowed or refused (operators and admins)."""
        entries, torn = agent.audit.read(since, limit)
        return AuditPage(entries=entries, torn_lines=torn)

    _document_gateway_routes(app)
    return app


def _accepted(deployment: Deployment, action: str) -> Accepted:
    return Accepted(
        deployment=deployment.name,
        action=action,
        desired_replicas=deployment.desired.replicas,
        desired_precision=deployment.desired.precision,
    )


_OPENAI_PATHS: dict[str, tuple[str, str]] = {
    "/v1/models": ("get", "List the deployments as OpenAI models."),
    "/v1/chat/completions": ("post", "OpenAI chat completions; `model` names the deployment."),
    "/v1/completions": ("post", "OpenAI text completions; `model` names the deployment."),
}


def _document_gateway_routes(app: FastAPI) -> None:
    # The routes themselves are served by AgentASGI in front of FastAPI; only document them.
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base_openapi()
        for path, (method, summary) in _OPENAI_PATHS.items():
            operation: dict[str, Any] = {
                "tags": ["inference"],
                "summary": summary,
                "responses": {"200": {"description": "the engine's answer; `X-Cache: hit|miss`"}},
            }
            if method == "post":
                operation["responses"].update({
                    "400": {"description": "OpenAI's invalid_request_error: the body breaks a "
                                           "rule of OpenAI's API; `error.param` names the field"},
                    "404": {"description": "no deployment is called `model` (model_not_found)"},
                    "413": {"description": "the body is over the size limit"},
                    "502": {"description": "the engine failed"},
                    "503": {"description": "no replica could be made ready in time"},
                    "504": {"description": "the engine did not answer in time"},
                })  # fmt: skip
            if method == "post":
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"type": "object", "required": ["model"]}}
                    },
                }
            schema["paths"][path] = {method: operation}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
