"""Sockets on both sides of the project's HTTP.

- Listening sockets for the daemons (agent, router): bound before anything starts, so an
  address in use or not on this host stops the daemon at once, naming it.
- Client connection pools (`http_connector`): an idle pooled connection is given up before the
  server on the other end closes it. A client that keeps one longer (aiohttp's default is 15 s)
  sometimes sends its next request on a connection the server is closing at that very moment,
  and the request fails with "Server disconnected" before any server saw it (aiohttp retries a
  GET then, never a POST). Measured here (benchmarks/keepalive.py): of POSTs sent about 5 s
  after the previous answer on the same connection, 6 of 50 to uvicorn and 3 of 30 to
  llama-server failed that way with aiohttp's default pool, none with this one. The servers
  the project talks to keep idle connections 5 s: uvicorn (the agent and the router,
  `SERVER_KEEPALIVE_S`, set explicitly; vLLM too) and cpp-httplib (llama-server); the llama.cpp
  worker (aiohttp's server) keeps them 75 s.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import aiohttp

__all__ = [
    "CLIENT_KEEPALIVE_S",
    "SERVER_KEEPALIVE_S",
    "bind_listener",
    "http_connector",
    "split_listen",
]

#: How long the daemons (uvicorn) keep an idle client connection open: uvicorn's default,
#: and llama-server's (cpp-httplib's CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND).
SERVER_KEEPALIVE_S = 5.0
#: How long the project's clients keep an idle pooled connection: a second under the servers',
#: so the client always gives it up first (its timer starts when the answer has arrived, which
#: is after the server's started).
CLIENT_KEEPALIVE_S = SERVER_KEEPALIVE_S - 1.0


def http_connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """An aiohttp connection pool whose idle connections end before the servers' do; `kwargs`
    as for `aiohttp.TCPConnector` (`limit`, `ssl`, ...)."""
    kwargs.setdefault("keepalive_timeout", CLIENT_KEEPALIVE_S)
    return aiohttp.TCPConnector(**kwargs)


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` as (host without IPv6 brackets, port); ValueError names what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port with a port in 1..65535, got {listen!r}")
    return host.strip("[]"), int(port)


def bind_listener(listen: str, where: str) -> socket.socket:
    """A listening socket on `listen` (host:port). ValueError starts with `where` (the file and
    the key the address came from) and says what to do."""
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(
            f"{where}: {host!r} is not an address of this host ({exc.strerror})"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(
                f"{where}: port {port} is in use (`ss -ltnp 'sport = :{port}'` shows who has "
                "it); choose another port"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"{where}: {host} is not an address of this host") from None
        raise ValueError(f"{where}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(False)
    return sock
