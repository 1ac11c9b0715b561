"""API keys for the router's inference endpoints: one per application or team.

A key reads `wok_<id>_<secret>`: the id (12 hex digits) names the key in lists, budgets, the
ledger and logs; the secret (32 random bytes, URL-safe base64) is shown once, when the key is
created, and never stored. What is stored is a salted hash: `sha256(salt || secret)` with a
random 16-byte salt per key. The secret carries 256 bits of entropy, so a slow password hash
would add nothing but latency to every request; the salt keeps two stores' hashes unrelated.
Checking a key finds its record by id and compares hashes in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["KEY_PREFIX", "KeyRecord", "hash_secret", "new_key", "parse"]

KEY_PREFIX = "wok_"
_KEY = re.compile(r"^wok_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class KeyRecord(BaseModel):
    """A key as stored and listed (the secret is never part of it)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    team: str
    name: str | None = None
    created_at: float
    revoked_at: float | None = None
    rpm: int | None = Field(None, description="requests per minute allowed; none: unlimited")
    tpm: int | None = Field(None, description="tokens per minute allowed; none: unlimited")
    salt: str = Field(repr=False, exclude=True)
    secret_hash: str = Field(repr=False, exclude=True)

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def matches(self, secret: str) -> bool:
        """Whether `secret` is this key's (constant time)."""
        return hmac.compare_digest(hash_secret(self.salt, secret), self.secret_hash)


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def new_key(team: str, name: str | None, rpm: int | None = None,
            tpm: int | None = None) -> tuple[str, KeyRecord]:  # fmt: skip
    """A new key: (the key to hand out once, the record to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = KeyRecord(
        id=key_id, team=team, name=name, created_at=time.time(), rpm=rpm, tpm=tpm,
        salt=salt, secret_hash=hash_secret(salt, secret),
    )  # fmt: skip
    return f"{KEY_PREFIX}{key_id}_{secret}", record


def parse(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key; None otherwise."""
    found = _KEY.match(key)
    return (found.group(1), found.group(2)) if found else None
