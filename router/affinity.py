"""Prefix affinity: requests that share a conversation prefix go to the same deployment while
its load allows, so its engine's prefix (KV) cache keeps hitting.

Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2016; KubeAI's
CHWBL): the deployments sit on a hash ring (`uhashring`, 40 virtual nodes each); a request's
prefix hashes to a point and walks the ring to the first deployment whose requests in flight,
this one included, stay within `load_factor` times the mean (rounded up). A prefix therefore
stays on one deployment until that one is busier than its share, and moves to the same next
one each time; adding or removing a deployment moves only the prefixes next to it on the ring.

The prefix of a chat request is every message but the last: the system prompt, and the turns
so far of a conversation. A request with a single message has none (nothing to reuse beyond
what any deployment would recompute), and neither has a plain completion.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from uhashring import HashRing

__all__ = ["Rings", "prefix_key"]

VNODES = 40


def prefix_key(body: Mapping[str, Any]) -> str | None:
    """The affinity key of a request body: a hash of its conversation prefix, or None."""
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    try:
        blob = orjson.dumps(messages[:-1])
    except TypeError:
        return None
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


class Rings:
    """Hash rings by the set of deployments on them (built once per set: ~0.1 ms)."""

    def __init__(self) -> None:
        self._rings: dict[frozenset[str], HashRing] = {}

    def _ring(self, keys: Sequence[str]) -> HashRing:
        members = frozenset(keys)
        ring = self._rings.get(members)
        if ring is None:
            if len(self._rings) > 256:  # fleets change; do not keep every set ever seen
                self._rings.clear()
            ring = self._rings[members] = HashRing(nodes=sorted(members), vnodes=VNODES)
        return ring

    def order(self, keys: Sequence[str], prefix: str, loads: Mapping[str, int],
              load_factor: float) -> list[str]:  # fmt: skip
        """`keys` in the order to try for `prefix`: the first on the ring from its point whose
        load stays within the bound, then the rest in ring order."""
        walk = [node["nodename"] for node in self._ring(keys).range(prefix, unique=True)]
        total = sum(loads.get(k, 0) for k in keys) + 1  # this request included
        bound = math.ceil(load_factor * total / len(keys))
        for i, key in enumerate(walk):
            if loads.get(key, 0) + 1 <= bound:
                return [key, *walk[:i], *walk[i + 1 :]]
        return walk
