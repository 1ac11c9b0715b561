"""The router's ASGI app: the OpenAI paths go straight to the proxy (`proxy.py`); the rest is
a small FastAPI app, OpenAPI-documented at /docs: `GET /v1/router` (routes, their split and
savings), `PATCH /v1/routes/{name}` (change a route's policy or bounds; operator token),
`/metrics` and `/healthz`."""

from __future__ import annotations

import secrets

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from wattops.router.api import Bounds, RoutePatch, RouterView
from wattops.router.core import Router
from wattops.router.proxy import OPENAI_PATHS, RouterGateway
from wattops.vocabulary.openai import error_body

__all__ = ["RouterASGI", "create_app"]

ROUTER_VERSION = "0.1.0"


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def create_app(router: Router) -> FastAPI:
    app = FastAPI(
        title="wattops-router",
        version=ROUTER_VERSION,
        description="One OpenAI endpoint for the fleet: each request to the deployment that "
        "meets its route's quality and latency bounds at the lowest cost, energy or carbon.",
    )

    def require_operator(request: Request) -> None:
        token = router.config.router.token
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "control endpoints need 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(403, "the bearer token is not this router's token")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed"}.get(exc.status_code, "http_error")  # fmt: skip
        return _error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

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

    @app.get("/v1/router", response_model=RouterView, tags=["router"])
    async def view() -> Response:
        """Per route: the bounds, each candidate's figures and share of the traffic, the
        estimated cost and energy against the reference's counterfactual, the last decisions."""
        return Response(router.view().model_dump_json(), media_type="application/json")

    @app.patch("/v1/routes/{name}", response_model=Bounds, tags=["router"],
               dependencies=[Depends(require_operator)])  # fmt: skip
    async def patch(name: str, change: RoutePatch) -> Bounds:
        """Change a route's policy or bounds now; kept across restarts (state_dir)."""
        if name not in router.routes:
            raise HTTPException(404, f"no route {name!r}; routes: {', '.join(router.routes)}")
        try:
            return router.patch(name, change)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/metrics", tags=["router"])
    async def metrics() -> Response:
        """Prometheus metrics (`wattops_route_*`)."""
        return Response(generate_latest(router.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class RouterASGI:
    """The OpenAI paths first (no FastAPI machinery on the hot path), then the API."""

    def __init__(self, gateway: RouterGateway, api: FastAPI) -> None:
        self.gateway = gateway
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in OPENAI_PATHS:
            await self.gateway(scope, receive, send)
        else:
            await self.api(scope, receive, send)
