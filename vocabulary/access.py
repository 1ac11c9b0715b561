"""Who may do what on a daemon: bearer tokens with roles, for the agent and the router alike.

Three roles, each allowing what the one before it does:

- `viewer`: reads (snapshots, events, metrics, history, routes, budgets, the audit log);
- `operator`: control (scale, precision and canaries, parking, route policy changes);
- `admin`: what changes who may spend or do what (keys, budgets, policies).

Tokens are configured as `[[tokens]]` tables (`name`, `role`, and the token's `hash`), in the
daemon's file or in a file it names (`tokens_file`), several per daemon. The hash is
`sha256$<salt hex>$<hex of sha256(salt || token)>`, made by `wattops token hash` (a token is
32 random bytes or more: a slow password hash would add latency and no strength). A plain
`token = "..."` in a table is accepted with a warning at start. The daemon's older single
`token` (and `$WATTOPS_TOKEN`) keeps working as one admin token named `token`.

A daemon that requires client certificates (`tls_client_ca`, vocabulary/tls.py) also takes a
certificate as a credential: its CN (or first subjectAltName) names the caller, and an
`O=wattops:<role>` in its subject gives the role. A bearer token, when sent, decides instead
of the certificate. Such a daemon is never open: a certificate without a role needs a token.

A request without a credential is 401; an unknown token is 403; a known token (or
certificate) whose role is below the one needed is 403 naming both ("needs operator; token
'grafana' is a viewer"). Tokens are compared in constant time, by their hash, and never
logged: a caller is named by its token's or certificate's name.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wattops.vocabulary.tls import PeerCertificate, peer_of

__all__ = [
    "ROLES",
    "Access",
    "AccessDenied",
    "Caller",
    "Role",
    "TokenEntry",
    "WhoAmI",
    "hash_token",
    "load_tokens",
    "unique_names",
]

log = logging.getLogger("wattops")

Role = Literal["viewer", "operator", "admin"]
#: In order: each role may do what the ones before it may.
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
_HASH_PREFIX = "sha256$"


def hash_token(token: str, salt: str | None = None) -> str:
    """The stored form of `token`: `sha256$<salt>$<digest>` with a random 16-byte salt."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.sha256(bytes.fromhex(salt) + token.encode()).hexdigest()
    return f"{_HASH_PREFIX}{salt}${digest}"


def _matches(stored: str, token: str) -> bool:
    _, salt, digest = stored.split("$")
    given = hashlib.sha256(bytes.fromhex(salt) + token.encode()).hexdigest()
    return hmac.compare_digest(given, digest)


class TokenEntry(BaseModel):
    """`[[tokens]]`: one bearer token, by name, with its role."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$",
                      description="who holds it: shown in the audit log and refusals")  # fmt: skip
    role: Role = Field(description="viewer, operator or admin")
    hash: str | None = Field(
        None, pattern=r"^sha256\$[0-9a-f]{32}\$[0-9a-f]{64}$",
        description="sha256$<salt>$<digest>, from `wattops token hash`",
    )  # fmt: skip
    token: str | None = Field(
        None, min_length=16, description="the token itself (accepted with a warning: prefer hash)"
    )

    @model_validator(mode="after")
    def _one_secret(self) -> TokenEntry:
        if (self.hash is None) == (self.token is None):
            raise ValueError(f"token {self.name!r}: give exactly one of hash (preferred) or token")
        return self

    def stored(self) -> str:
        return self.hash if self.hash is not None else hash_token(self.token or "")


def load_tokens(path: Path) -> list[TokenEntry]:
    """The `[[tokens]]` of a tokens file; ValueError naming the file and what is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"tokens_file {path}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"tokens_file {path}: not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"tokens"})
    if extra:
        raise ValueError(f"tokens_file {path}: only [[tokens]] tables belong here, not "
                         f"{', '.join(extra)}")  # fmt: skip
    entries = data.get("tokens", [])
    out = []
    for n, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        try:
            out.append(TokenEntry.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())  # fmt: skip
            raise ValueError(f"tokens_file {path}: tokens[{n}]: {problems}") from None
    return out


def unique_names(entries: Iterable[TokenEntry]) -> None:
    """ValueError naming the token names given twice."""
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"token names must be unique; repeated: {', '.join(twice)}")


class WhoAmI(BaseModel):
    """`GET /v1/whoami`: who the bearer token names and what it may do here."""

    name: str | None = Field(description="the token's (or client certificate's) name; none "
                             "without either")  # fmt: skip
    role: Role | None = Field(description="its role; none without a credential")
    via: Literal["token", "certificate"] | None = Field(
        None, description="what named the caller: a bearer token or a client certificate"
    )
    open: bool = Field(description="no token configured here: everything is allowed")
    reads: Literal["open", "viewer"] = Field(description="whether reads need a token")
    may_control: bool = Field(description="operator actions (scale, precision) are allowed")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a token's (or client certificate's) name and role (`anonymous`: no
    credential was needed)."""

    name: str
    role: Role
    via: Literal["token", "certificate"] = "token"

    def may(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS_ADMIN = Caller("anonymous", "admin")


class AccessDenied(Exception):
    """401 (no credentials) or 403 (unknown, or a role too low): `status`, `code`, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Access:
    """A daemon's tokens; `check` answers who a request's caller is, or why not."""

    def __init__(self, entries: Iterable[TokenEntry], legacy_token: str | None = None,
                 what: str = "daemon", certificates: bool = False) -> None:  # fmt: skip
        self.what = what
        #: Client certificates are required (`tls_client_ca`): they are credentials too.
        self.certificates = certificates
        self._tokens: list[tuple[str, str, Role]] = []
        for e in entries:
            if e.token is not None:
                log.warning("%s: token %r is written in plain text: store its hash instead "
                            "(wattops token hash)", what, e.name)  # fmt: skip
            self._tokens.append((e.stored(), e.name, e.role))
        if legacy_token:
            self._tokens.append((hash_token(legacy_token), "token", "admin"))

    @property
    def open(self) -> bool:
        """No token configured and no client certificate required: everything is allowed, as
        before roles existed."""
        return not self._tokens and not self.certificates

    def identify(self, authorization: str | None,
                 peer: PeerCertificate | None = None) -> Caller | None:  # fmt: skip
        """The caller a bearer token names, else the one a client certificate with a role
        names; None without either. AccessDenied(403) if the token is unknown."""
        scheme, _, given = (authorization or "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            if self.certificates and peer is not None and peer.role in ROLES:
                return Caller(peer.name, peer.role, "certificate")
            return None
        found = None
        for stored, name, role in self._tokens:  # every one compared: no early exit to time
            if _matches(stored, given) and found is None:
                found = Caller(name, role)
        if found is None:
            raise AccessDenied(403, "forbidden", f"the bearer token is not one of this "
                               f"{self.what}'s tokens")  # fmt: skip
        return found

    def name_of(self, scope: Any, authorization: str | None) -> str:
        """Who sent a request, for the audit log: the caller the app accepted (in the ASGI
        scope's `state`), else whatever its credentials say (`no token`, `unknown token`, or
        the client certificate's name)."""
        state = scope.get("state")
        caller = state.get("caller") if isinstance(state, dict) else None
        if isinstance(caller, Caller):
            return caller.name
        if self.open:
            return "anonymous"
        peer = peer_of(scope)
        try:
            found = self.identify(authorization, peer)
        except AccessDenied:
            return "unknown token"
        if found is not None:
            return found.name
        return f"certificate {peer.name}" if peer is not None else "no token"

    def check(self, authorization: str | None, role: Role, what: str,
              peer: PeerCertificate | None = None) -> Caller:  # fmt: skip
        """The caller, if it may do `what` (which needs `role`); AccessDenied otherwise."""
        if self.open:
            return ANONYMOUS_ADMIN
        caller = self.identify(authorization, peer)
        if caller is None:
            also = (f" or a client certificate carrying O=wattops:{role}"
                    if self.certificates else "")  # fmt: skip
            held = (f"; certificate {peer.name!r} carries no role"
                    if self.certificates and peer is not None else "")  # fmt: skip
            raise AccessDenied(401, "unauthorized",
                               f"{what} needs 'Authorization: Bearer <token>' of a {role} "
                               f"(or higher role){also}{held}")  # fmt: skip
        if not caller.may(role):
            raise AccessDenied(403, "forbidden",
                               f"{what} needs the {role} role; {caller.via} {caller.name!r} is "
                               f"a {caller.role}")  # fmt: skip
        return caller
