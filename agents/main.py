"""`wattops-agent --config agent.toml`: the node daemon's entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from wattops.agents.app import create_asgi
from wattops.agents.config import AgentConfig, ConfigError, load_config
from wattops.agents.node import AGENT_VERSION, NodeAgent
from wattops.vocabulary.net import SERVER_KEEPALIVE_S, bind_listener
from wattops.vocabulary.tls import TLSHttpToolsProtocol, server_tls

log = logging.getLogger("wattops.agent")


def bind(config: AgentConfig) -> socket.socket:
    """The API's listening socket, bound before anything starts: an address in use or not on
    this host stops the agent at once, naming it, instead of after replicas have started."""
    try:
        return bind_listener(config.agent.listen, f"{config.source}: agent.listen = "
                             f"{config.agent.listen}")  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def serve(config: AgentConfig) -> None:
    """Start the agent, serve its API until SIGINT/SIGTERM, then stop every replica."""
    a = config.agent
    try:
        tls = server_tls(a.tls_cert, a.tls_key, a.tls_client_ca, f"{config.source}: agent")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    listener = bind(config)
    agent = NodeAgent(config)
    try:
        await agent.start()
    except BaseException:
        listener.close()
        await agent.close()  # nothing was started that needs stopping; state stays as saved
        raise
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                create_asgi(agent),
                host=config.agent.host,
                port=config.agent.port,
                http=TLSHttpToolsProtocol if tls is not None else "httptools",
                lifespan="off",
                proxy_headers=False,
                access_log=False,
                log_level="warning",
                timeout_graceful_shutdown=10,
                timeout_keep_alive=int(SERVER_KEEPALIVE_S),
                ssl_context_factory=tls.factory if tls is not None else None,
            )
        )
        if tls is not None:
            # A renewed certificate is read again on SIGHUP, without dropping a connection.
            signal.signal(signal.SIGHUP, lambda signum, frame: tls.reload())

        # uvicorn handles SIGINT/SIGTERM while it serves, then raises the signal again with
        # the handlers that were in place before it started. With Python's defaults that
        # kills the process before `agent.stop()` below: replicas orphaned, the last seconds
        # of counters unsaved. These handlers end the serving instead, so the stop runs.
        def request_exit(signum: int, frame: object) -> None:
            server.should_exit = True

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, request_exit)
        log.info(
            "wattops-agent %s serving node %s on %s://%s",
            AGENT_VERSION,
            config.agent.node,
            "https" if tls is not None else "http",
            config.agent.listen,
        )
        await server.serve(sockets=[listener])
    finally:
        await agent.stop()


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the config, run until stopped. Exit 2 on a bad config."""
    parser = argparse.ArgumentParser(prog="wattops-agent", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="agent TOML file")
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
        print(f"wattops-agent: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
