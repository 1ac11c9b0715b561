"""TLS for the agent's and the router's HTTP servers, and for the clients that call them.

Server side (`tls_cert`, `tls_key`, optional `tls_client_ca` in `[agent]` or `[router]`): the
daemon serves HTTPS with that certificate, TLS 1.2 at least. With `tls_client_ca`, every client
must present a certificate signed by that CA (mutual TLS): a connection without one is refused
during the handshake, before any HTTP. The certificate names the caller (its subject's CN, else
its first subjectAltName) and may carry a role, as Kubernetes carries groups: an `O=wattops:<role>`
in its subject (`wattops:viewer`, `wattops:operator`, `wattops:admin`; the highest one given
counts). A bearer token, when sent, decides instead (vocabulary/access.py). The peer's
certificate reaches the app as the ASGI TLS extension's `client_cert_name` plus
`wattops_peer` (a `PeerCertificate`), added by `TLSHttpToolsProtocol`. On SIGHUP the
daemon reads the certificate and key again: new connections get the new certificate, open ones
keep theirs (nothing is dropped), and a pair that does not load is refused with a log line while
the old one stays in service.

Client side: `client_context(ca, cert, key)` verifies the server against `ca` (a CA bundle; none:
the system's), and presents `cert`/`key` when the server asks for one; the CLI, the console and
the router take them from `$WATTOPS_CA`, `$WATTOPS_CLIENT_CERT` and `$WATTOPS_CLIENT_KEY`
(`wattops --ca FILE` sets the first).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = [
    "PeerCertificate",
    "ServerTLS",
    "TLSHttpToolsProtocol",
    "client_context",
    "client_ssl",
    "peer_certificate",
    "peer_of",
    "server_tls",
    "tls_pair_problem",
]

log = logging.getLogger("wattops")

#: `O=wattops:<role>` in a client certificate's subject carries that role.
ROLE_PREFIX = "wattops:"
_ROLE_ORDER = ("viewer", "operator", "admin")


@dataclass(frozen=True)
class PeerCertificate:
    """What a verified client certificate says about its holder."""

    #: The subject's commonName, else the first subjectAltName (DNS, email or URI).
    name: str
    #: From `O=wattops:<role>`; None when it carries none (a bearer token must then decide).
    role: str | None
    #: The subject as RFC 4514 writes it (`CN=alice,O=wattops:operator`), for the ASGI scope.
    subject: str


def peer_certificate(cert: dict[str, Any] | None) -> PeerCertificate | None:
    """From `SSLObject.getpeercert()` of a verified peer; None without a certificate."""
    if not cert:
        return None
    pairs = [pair for rdn in cert.get("subject", ()) for pair in rdn]
    common = [value for key, value in pairs if key == "commonName"]
    sans = [value for _, value in cert.get("subjectAltName", ())]
    roles = [value.removeprefix(ROLE_PREFIX) for key, value in pairs
             if key == "organizationName" and value.removeprefix(ROLE_PREFIX) in _ROLE_ORDER
             and value.startswith(ROLE_PREFIX)]  # fmt: skip
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}  # fmt: skip
    subject = ",".join(f"{names.get(k, k)}={v}" for k, v in reversed(pairs))
    name = (common or sans or [subject or "unnamed certificate"])[0]
    role = max(roles, key=_ROLE_ORDER.index) if roles else None
    return PeerCertificate(name=name, role=role, subject=subject)


class TLSHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, adding the client's verified certificate to each
    request's scope as the ASGI TLS extension does (uvicorn itself does not)."""

    _tls_extension: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        peer = peer_certificate(ssl_object.getpeercert())
        self._tls_extension = {
            "client_cert_name": peer.subject if peer else None,
            "client_cert_error": None,
            "wattops_peer": peer,
        }

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls_extension is not None:
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]
            scope["extensions"] = {"tls": self._tls_extension}


def peer_of(scope: Any) -> PeerCertificate | None:
    """The verified client certificate of a request's ASGI scope, if any."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    peer = tls.get("wattops_peer")
    return peer if isinstance(peer, PeerCertificate) else None


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
