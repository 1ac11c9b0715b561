"""Acting on a deployment through the fleet core when the agent goes away mid-way."""

from __future__ import annotations

from wattops.agents.api import NodeSnapshot
from wattops.fleet.client import AgentUnreachable
from wattops.fleet.target import AgentTarget


async def test_an_agent_lost_while_following_leaves_the_outcome_unknown() -> None:
    async def gone() -> NodeSnapshot:
        raise AgentUnreachable("http://127.0.0.1:9", 0, "unreachable", "cannot connect")

    target = AgentTarget(deployment="tiny", where="n1", precision="q8_0", desired_replicas=1,
                         max_replicas=3, url="http://127.0.0.1:9", snapshots=gone)  # fmt: skip
    outcome = await target.follow("scale", 2, timeout_s=5.0)
    # Accepted but not seen through: neither done nor failed, and said so.
    assert outcome.done is None
    assert "lost touch with the agent" in outcome.message and "cannot connect" in outcome.message
