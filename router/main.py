"""`wattops-router --config router.toml`: the router daemon's entry point."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn

from wattops.router.app import ROUTER_VERSION, RouterASGI, create_app
from wattops.router.config import ConfigError, RouterConfig, load_config
from wattops.router.core import Router
from wattops.router.proxy import RouterGateway
from wattops.vocabulary.net import SERVER_KEEPALIVE_S, bind_listener, http_connector
from wattops.vocabulary.tls import TLSHttpToolsProtocol, client_ssl, server_tls

log = logging.getLogger("wattops.router")


def _discover(config: RouterConfig, kube: Any) -> list[str]:
    """The agents to follow: the file's, plus the running agent pods the Kubernetes API lists
    (`kubernetes = true`: in a pod through its service account, else the kubeconfig)."""
    urls = config.agent_urls()
    if kube is not None:
        urls += kube.agent_urls()
    return list(dict.fromkeys(urls))


async def _keep_discovering(config: RouterConfig, kube: Any, router: Router) -> None:
    """Every `discovery_interval_s`: follow agent pods that appeared, drop those gone. A
    failed listing keeps the agents already known (logged)."""
    from wattops.fleet.kube import KubeError

    while True:
        await asyncio.sleep(config.router.discovery_interval_s)
        try:
            urls = await asyncio.to_thread(_discover, config, kube)
        except KubeError as exc:
            log.warning("agent discovery failed, keeping the agents known: %s", exc)
            continue
        added, removed = router.fleet.sync(urls)
        if added or removed:
            log.info("agents: %d found, %d gone (%d followed)", len(added), len(removed),
                     len(router.fleet.links))  # fmt: skip


async def serve(config: RouterConfig) -> None:
    r = config.router
    try:
        tls = server_tls(r.tls_cert, r.tls_key, r.tls_client_ca, f"{config.source}: router")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    where = f"{config.source}: router.listen = {config.router.listen}"
    try:
        listener = bind_listener(config.router.listen, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    kube = None
    if config.router.kubernetes:
        from wattops.fleet.kube import KubeError, KubeFleet

        try:
            kube = KubeFleet.from_environment()
            urls = _discover(config, kube)
        except KubeError as exc:
            listener.close()
            raise ConfigError(f"{config.source}: kubernetes = true: {exc}") from None
    else:
        urls = _discover(config, None)
    try:
        router = Router(config, urls)
    except ConnectionError as exc:  # the store (Redis) is not there: say which, do not start
        listener.close()
        raise ConfigError(f"{config.source}: router.{exc}") from None
    router.fleet.start()
    connector = http_connector(limit=0, ttl_dns_cache=300, ssl=client_ssl())
    session = aiohttp.ClientSession(connector=connector)
    if config.router.budget_webhooks:
        from wattops.router.notify import Notifier

        router.notify_with(Notifier(config.router.budget_webhooks, session))
    host, _, port = config.router.listen.rpartition(":")
    server = uvicorn.Server(uvicorn.Config(
        RouterASGI(RouterGateway(router, session), create_app(router)),
        host=host.strip("[]"), port=int(port),
        http=TLSHttpToolsProtocol if tls is not None else "httptools", lifespan="off",
        proxy_headers=False, access_log=False, log_level="warning", timeout_graceful_shutdown=10,
        timeout_keep_alive=int(SERVER_KEEPALIVE_S),
        ssl_context_factory=tls.factory if tls is not None else None,
    ))  # fmt: skip
    if tls is not None:
        # A renewed certificate is read again on SIGHUP, without dropping a connection.
        signal.signal(signal.SIGHUP, lambda signum, frame: tls.reload())

    def request_exit(signum: int, frame: object) -> None:
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_exit)

    async def keep_learned() -> None:
        every = min(5.0, config.router.fleet_sample_s)
        while True:
            await asyncio.sleep(every)
            try:
                # A file and a store write: in a thread, off the event loop.
                await asyncio.to_thread(router.maybe_save_learned)
                await asyncio.to_thread(router.maybe_sample_fleet, config.router.fleet_sample_s)
                await router.charging.book.aheartbeat()  # a shared store's: this router is alive
            except Exception as exc:  # a store down for a while: try again at the next beat
                log.error("keeping state: %s", exc)

    tasks = [asyncio.create_task(keep_learned())]
    if kube is not None:
        tasks.append(asyncio.create_task(_keep_discovering(config, kube, router)))
    log.info("wattops-router %s serving %d routes on %s://%s", ROUTER_VERSION,
             len(router.routes), "https" if tls else "http", config.router.listen)  # fmt: skip
    try:
        await server.serve(sockets=[listener])
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        router.save_learned()
        if router.notifier is not None:
            await router.notifier.drain()
        await router.fleet.stop()
        await session.close()


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the config, route until stopped. Exit 2 on a bad config."""
    parser = argparse.ArgumentParser(prog="wattops-router", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="router TOML file")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        try:
            import uvloop

            uvloop.run(serve(config))
        except ImportError:
            asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"wattops-router: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
