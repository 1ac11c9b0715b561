"""The project's client pools against the project's servers: an idle pooled connection is given
up by the client before the server closes it, so no request is ever sent on a connection the
server is closing (the race that cost the full bench a request in a few thousand; the
counts, with and without, are in benchmarks/keepalive.py and docs/benchmarks.md). A real
uvicorn server configured as the agent and the router configure theirs; real aiohttp pools."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import uvicorn

from tests.conftest import free_port
from wattops.vocabulary.net import CLIENT_KEEPALIVE_S, SERVER_KEEPALIVE_S, http_connector


async def test_the_pools_idle_limit_is_under_the_servers() -> None:
    assert CLIENT_KEEPALIVE_S < SERVER_KEEPALIVE_S
    connector = http_connector(limit=3)
    assert connector.limit == 3  # the other arguments pass through
    assert connector._keepalive_timeout == CLIENT_KEEPALIVE_S
    await connector.close()


async def _client_port_of(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        return int(await response.text())


async def test_a_pool_opens_a_new_connection_where_the_server_would_soon_close_the_old() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        port = str(scope["client"][1]).encode()  # the client's side of this connection
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": port})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error",
        timeout_keep_alive=int(SERVER_KEEPALIVE_S),  # as agents/main.py and router/main.py
    ))  # fmt: skip
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        ours = aiohttp.ClientSession(connector=http_connector())
        default = aiohttp.ClientSession(connector=aiohttp.TCPConnector())  # idle limit 15 s
        async with ours, default:
            first = await asyncio.gather(_client_port_of(ours, url), _client_port_of(default, url))
            # Idle past the client's limit, within a second of the server's close.
            await asyncio.sleep((CLIENT_KEEPALIVE_S + SERVER_KEEPALIVE_S) / 2)
            second = await asyncio.gather(_client_port_of(ours, url), _client_port_of(default, url))
    finally:
        server.should_exit = True
        await task
    assert second[0] != first[0], "our pool reused a connection the server closes within 0.5 s"
    # The default pool does reuse it: this is the connection a request can be lost on.
    assert second[1] == first[1]
