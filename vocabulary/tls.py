"""TLS for the agent's and the router's HTTP servers, and for the clients that call them.

Server side (`tls_cert`, `tls_key`, optional `tls_client_ca` in `[agent]` or `[router]`): the
daemon serves HTTPS with that certificate, TLS 1.2 at least. With `tls_client_ca`, every client
must present a certificate signed by that CA (mutual TLS): a connection without one is refused
during the handshake, before any HTTP; the bearer token still decides the role. On SIGHUP the
daemon reads the certificate and key again: new connections get the new certificate, open ones
keep theirs (nothing is dropped), and a pair that does not load is refused with a log line while
the old one stays in service.

Client side: `client_context(ca, cert, key)` verifies the server against `ca` (a CA bundle; none:
the system's), and presents `cert`/`key` when the server asks for one; the CLI, the console and
the router take them from `$WATTOPS_CA`, `$WATTOPS_CLIENT_CERT` and `$WATTOPS_CLIENT_KEY`
(`wattops --ca FILE` sets the first).
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from pathlib import Path
from typing import Any

__all__ = ["ServerTLS", "client_context", "client_ssl", "server_tls", "tls_pair_problem"]

log = logging.getLogger("wattops")


class ServerTLS:
    """A server's SSLContext, reloadable in place (uvicorn keeps using the same object)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(cert, key)  # ssl.SSLError / OSError: the caller says which
        if client_ca is not None:
            self.context.load_verify_locations(cafile=client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED

    def reload(self) -> bool:
        """Read the certificate and key again (SIGHUP). False, and the old pair kept, if the
        new one does not load."""
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            log.error("TLS: %s / %s did not load (%s); still serving the previous certificate",
                      self.cert, self.key, exc)  # fmt: skip
            return False
        log.info("TLS: reloaded %s", self.cert)
        return True

    def factory(self, config: Any, default: Any) -> ssl.SSLContext:
        """For uvicorn's `ssl_context_factory`: this context, not one of its own."""
        return self.context


def tls_pair_problem(cert: Path | None, key: Path | None, client_ca: Path | None) -> str | None:
    """What is wrong with a section's TLS keys, or None (a config validator's message)."""
    if (cert is None) != (key is None):
        return "tls_cert and tls_key go together: give both (HTTPS) or neither (HTTP)"
    if client_ca is not None and cert is None:
        return "tls_client_ca needs tls_cert and tls_key (client certificates are a TLS feature)"
    return None


def server_tls(cert: Path | None, key: Path | None, client_ca: Path | None,
               where: str) -> ServerTLS | None:  # fmt: skip
    """The server's TLS (None: plain HTTP); ValueError naming the file that does not load."""
    if cert is None or key is None:
        return None
    try:
        return ServerTLS(cert, key, client_ca)
    except FileNotFoundError as exc:
        raise ValueError(f"{where}: {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{where}: tls_cert {cert} / tls_key {key}"
                         f"{f' / tls_client_ca {client_ca}' if client_ca else ''} did not load: "
                         f"{exc}") from None  # fmt: skip


def client_context(ca: Path | None = None, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:  # fmt: skip
    """A client context verifying servers against `ca` (or the system's CAs), presenting
    `cert`/`key` to servers that want a client certificate."""
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@functools.cache
def _from_env(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    return client_context(Path(ca) if ca else None, Path(cert) if cert else None,
                          Path(key) if key else None)  # fmt: skip


def client_ssl() -> ssl.SSLContext | bool:
    """For the operator tools' and the router's HTTPS clients: a context from `$WATTOPS_CA`
    (the CA bundle that signed the daemons' certificates) and `$WATTOPS_CLIENT_CERT` /
    `$WATTOPS_CLIENT_KEY` (for daemons that want a client certificate); `True` (aiohttp's
    default: the system's CAs) when none is set."""
    ca = os.environ.get("WATTOPS_CA") or None
    cert = os.environ.get("WATTOPS_CLIENT_CERT") or None
    key = os.environ.get("WATTOPS_CLIENT_KEY") or None
    if ca is None and cert is None:
        return True
    return _from_env(ca, cert, key)
