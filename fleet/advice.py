"""Recommendations from the fleet's figures: what parking or a lower precision would save.

Parking advice comes from the agents' own alerts (measured share x list price). Precision
advice is a model, not a measurement, and says so: single-stream decoding on llama.cpp is
bound by memory bandwidth, so energy per generated token scales roughly with the bytes read
per token, i.e. with bits per weight. The figures below are llama.cpp's bits per weight for a
7B llama model (from llama.cpp's quantize tool).
"""

from __future__ import annotations

from dataclasses import dataclass

from wattops.agents.api import NodeSnapshot

#: Bits per weight of llama.cpp types (llama.cpp `quantize --help`, 7B llama).
BITS_PER_WEIGHT: dict[str, float] = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "q8_0": 8.50,
    "q6_k": 6.56,
    "q5_k_m": 5.67,
    "q5_k_s": 5.52,
    "q5_1": 6.0,
    "q5_0": 5.5,
    "q4_k_m": 4.83,
    "q4_k_s": 4.57,
    "iq4_nl": 4.5,
    "iq4_xs": 4.25,
    "q4_1": 5.0,
    "q4_0": 4.5,
    "q3_k_l": 4.27,
    "q3_k_m": 3.91,
    "q3_k_s": 3.5,
    "q2_k": 3.35,
}
#: The precision the advice points to, and the highest it advises from.
ADVISED = "q4_k_m"


@dataclass(frozen=True)
class Recommendation:
    """One piece of advice with the arithmetic behind it."""

    id: str
    node: str
    deployment: str
    message: str
    detail: str


def precision_advice(url: str, snapshot: NodeSnapshot) -> list[Recommendation]:
    """`q4_k_m on node: about -43% J/token` for deployments serving a wider type."""
    found = []
    for dep in snapshot.deployments:
        now = BITS_PER_WEIGHT.get(dep.precision)
        if (
            now is None
            or ADVISED not in dep.available_precisions
            or now <= BITS_PER_WEIGHT[ADVISED]
            or dep.ready_replicas == 0
        ):
            continue
        change = BITS_PER_WEIGHT[ADVISED] / now - 1.0
        found.append(
            Recommendation(
                id=f"{url}|{dep.name}|precision",
                node=snapshot.node,
                deployment=dep.name,
                message=f"{ADVISED} on {snapshot.node}/{dep.name}: about {change:+.0%} J/token",
                detail=(
                    f"Estimate, not a measurement: decoding is memory-bound, so J/token scales "
                    f"with bits per weight: {BITS_PER_WEIGHT[ADVISED]} / {now} - 1 = "
                    f"{change:+.1%} from {dep.precision}. The deployment's measured J/token is "
                    "in its row; check quality before switching (`wattops quality MODEL` "
                    "gives each precision's agreement with the base)."
                ),
            )
        )
    return found
