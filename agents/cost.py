"""What holding and powering a node costs: the one place where prices meet shares and watts.

Every dollar and gram figure the agent shows asks a `CostModel`: the accounting's totals, the
snapshot's $/h (node burn, deployments, unallocated), the budget and parking alerts.

- Hardware: the node's price per hour (cloud on-demand rental, or purchase price over
  lifetime for owned hardware) times the share of the node held.
- Electricity: on owned hardware only (a cloud price already includes it): kWh x PUE x $/kWh.
- Carbon: kWh x PUE x grid gCO2e/kWh. The PUE is the site's, except for cloud hardware whose
  profile carries the provider's published figure (its energy is used in their buildings).
- Shares: a running replica holds max(its memory share, its compute share) of the node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wattops.profiles import HardwareProfile, SiteProfile

if TYPE_CHECKING:
    from wattops.agents.supervisor import LiveReplica

J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class CostModel:
    """Prices and capacities from the hardware and site profiles."""

    profile: str
    kind: str
    node_usd_per_hour: float
    owned: bool
    price_basis: str
    electricity_usd_per_kwh: float
    pue: float
    grid_gco2e_per_kwh: float
    idle_watts: float
    max_watts: float
    accelerators: int
    memory_bytes: int
    cpu_cores: int
    #: Where `pue` comes from: the cloud provider's published figure, or the site profile.
    pue_basis: str = ""

    @classmethod
    def from_profiles(cls, hardware: HardwareProfile, site: SiteProfile) -> CostModel:
        """Build from validated profiles; CPU cores default to this host's."""
        price = hardware.price
        # Cloud hardware runs in the provider's data centers: their PUE, when published.
        facility = hardware.facility if not price.owned else None
        basis = (
            f"owned: ${price.purchase_usd:,.0f} over {price.lifetime_years:g} years"
            if price.owned
            else f"cloud on-demand ${price.cloud_usd_per_hour:.4g}/h"
        )
        return cls(
            profile=hardware.name,
            kind=hardware.kind,
            node_usd_per_hour=price.usd_per_hour,
            owned=price.owned,
            price_basis=f"{basis} ({price.source}, {price.as_of})",
            electricity_usd_per_kwh=site.electricity_usd_per_kwh,
            pue=facility.pue if facility else site.pue,
            pue_basis=(
                f"the provider's: {facility.source} ({facility.as_of})"
                if facility
                else f"site {site.name}: {site.source} ({site.as_of})"
            ),
            grid_gco2e_per_kwh=site.grid_gco2e_per_kwh,
            idle_watts=hardware.idle_watts,
            max_watts=hardware.max_watts,
            accelerators=max(1, hardware.accelerators),
            memory_bytes=int(hardware.memory_gb * 2**30),
            cpu_cores=hardware.cpu_cores or os.cpu_count() or 1,
        )

    def electricity_usd(self, joules: float) -> float:
        """What the electricity for `joules` costs; 0 on cloud (the rental includes it)."""
        if not self.owned:
            return 0.0
        return joules / J_PER_KWH * self.pue * self.electricity_usd_per_kwh

    def carbon_g(self, joules: float) -> float:
        """gCO2e for `joules` at the device, facility overhead (PUE) included."""
        return joules / J_PER_KWH * self.pue * self.grid_gco2e_per_kwh

    def compute_share(self, live: LiveReplica) -> float:
        """The part of the node's compute one busy replica uses."""
        return self.threads_share(live.replica.threads)

    def threads_share(self, threads: int | None) -> float:
        """The part of the node's compute a job uses: its threads of the cores on a CPU node,
        one accelerator of the node's on a GPU or Jetson node."""
        if self.kind == "cpu":
            return min(1.0, (threads or 1) / self.cpu_cores)
        return 1.0 / self.accelerators

    def holding(self, live: LiveReplica) -> float:
        """The share of the node a running replica holds: max(memory, compute)."""
        memory = (live.replica.memory_bytes or 0) / self.memory_bytes if self.memory_bytes else 0
        return min(1.0, max(memory, self.compute_share(live)))

    def hardware_usd(self, seconds: float, share: float = 1.0) -> float:
        """What holding `share` of the node for `seconds` costs (electricity excluded)."""
        return self.node_usd_per_hour * share * seconds / 3600.0

    def usd(self, seconds: float, share: float, joules: float) -> float:
        """What holding `share` for `seconds` and using `joules` costs: hardware + electricity."""
        return self.hardware_usd(seconds, share) + self.electricity_usd(joules)

    def usd_per_hour(self, share: float, watts: float) -> float:
        """The rate of holding `share` while drawing `watts`: hardware + electricity, per hour."""
        return self.usd(3600.0, share, watts * 3600.0)
