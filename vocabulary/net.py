"""Listening sockets for the daemons (agent, router): bound before anything starts, so an
address in use or not on this host stops the daemon at once, naming it."""

from __future__ import annotations

import errno
import socket

__all__ = ["bind_listener", "split_listen"]


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
