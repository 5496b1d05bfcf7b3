"""Settings of capability 3 (section ``network``): address lifecycle limits, the physical
pool ``edgevisor up`` creates, reconciliation timers and the host dataplane."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.network.dp_core import DataplaneSettings
from edgevisor.network.ipam import IpamSettings

__all__ = ["AUTO_FABRIC", "NetworkSettings"]

#: ``dataplane.fabric_if`` value meaning: the interface of the route towards the controller.
AUTO_FABRIC = "auto"


def _default_dataplane() -> DataplaneSettings:
    return DataplaneSettings(fabric_if=AUTO_FABRIC)


class NetworkSettings(BaseModel):
    """Preserved logical addresses: IPAM limits, record push and reconciliation, dataplane."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hold_down_s: float = Field(
        300.0, ge=0,
        description="Seconds a released address stays held before it can be allocated again.",
    )
    leak_grace_s: float = Field(
        600.0, ge=0,
        description=(
            "Seconds a bound address whose instance its host no longer reports must stay "
            "missing before leak collection releases it."
        ),
    )
    min_prefix_v4: int = Field(
        8, ge=0, le=32, description="Largest IPv4 network an account may create (prefix length)."
    )
    max_prefix_v4: int = Field(
        30, ge=0, le=32, description="Smallest IPv4 network an account may create (prefix length)."
    )
    min_prefix_v6: int = Field(
        48, ge=0, le=128, description="Largest IPv6 network an account may create (prefix length)."
    )
    max_prefix_v6: int = Field(
        126, ge=0, le=128,
        description="Smallest IPv6 network an account may create (prefix length).",
    )
    host_group: str = Field(
        "default", description="Host group whose physical pool gives hosts their addresses."
    )
    default_physical_cidr: str | None = Field(
        None,
        description=(
            "Physical pool created for `host_group` when the first address is bound and no "
            "pool exists (for `edgevisor up`); empty: an admin creates pools explicitly."
        ),
    )
    push_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one push of records to a host's agent."
    )
    reconcile_interval_s: float = Field(
        2.0, gt=0,
        description="Seconds between drift checks (hosts behind on a record get its set again).",
    )
    leak_interval_s: float = Field(
        30.0, gt=0, description="Seconds between leak collections and hold-down expiries."
    )
    dataplane_mode: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Whether the agent runs the address-translation dataplane: auto = only as root "
            "and only when the controller is not on loopback (not a single machine)."
        ),
    )
    instance_netns_prefix: str = Field(
        "evi-", max_length=32,
        description="Prefix of the network namespaces the agent creates for instances.",
    )
    dataplane: DataplaneSettings = Field(
        default_factory=_default_dataplane,
        description=(
            "Host dataplane (nftables table, marks, routing tables); fabric_if `auto` is the "
            "interface of the route towards the controller."
        ),
    )

    def ipam(self) -> IpamSettings:
        """The limits in the shape :mod:`edgevisor.network.records` takes."""
        return IpamSettings(
            min_prefix_v4=self.min_prefix_v4, max_prefix_v4=self.max_prefix_v4,
            min_prefix_v6=self.min_prefix_v6, max_prefix_v6=self.max_prefix_v6,
            hold_down_s=self.hold_down_s, leak_grace_s=self.leak_grace_s,
        )

    def dataplane_enabled(self) -> bool:
        if self.dataplane_mode == "auto":
            return os.geteuid() == 0
        return self.dataplane_mode == "on"
