"""Settings of the coordinated-devices part of the agent, apart from the heavy modules.

Kept in its own module so reading settings does not import the MQTT broker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.devices.spool import DropPolicy

__all__ = ["DevicesSettings"]


class DevicesSettings(BaseModel):
    """Settings of the coordinated-devices part of the agent (``[devices]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_host: str = Field(
        "127.0.0.1", description="Address the embedded MQTT broker listens on."
    )
    broker_port: int = Field(
        1883, ge=0, le=65535, description="TCP port of the embedded MQTT broker (MQTT 3.1.1)."
    )
    tls_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "TCP port of the embedded broker's TLS listener (MQTT over TLS, client "
            "certificates required); empty: no TLS listener. Devices then get a client "
            "certificate from the agent's devices CA on `device add`."
        ),
    )
    tls_dir: Path | None = Field(
        None,
        description="Devices CA and broker certificate. Empty: `<devices data_dir>/tls`.",
    )
    tls_names: tuple[str, ...] = Field(
        (),
        description=(
            "Extra DNS names (or addresses) for the broker's server certificate, besides "
            "`localhost`, 127.0.0.1 and `broker_host`."
        ),
    )
    external_broker_cafile: Path | None = Field(
        None,
        description="CA bundle that verifies an external broker given as `mqtts://` (PEM).",
    )
    external_broker_certfile: Path | None = Field(
        None,
        description="Client certificate the agent presents to an `mqtts://` broker (PEM).",
    )
    external_broker_keyfile: Path | None = Field(
        None, description="Key of `external_broker_certfile` (PEM)."
    )
    external_broker_url: str | None = Field(
        None,
        description=(
            "Use this broker instead of the embedded one, e.g. "
            "`mqtt://agent:secret@127.0.0.1:1883`; the agent is then only a client and the "
            "broker enforces device credentials and ACLs itself."
        ),
    )
    data_dir: Path | None = Field(
        None, description="Where devices.db and spool.db live. Empty: `<data_dir>/devices`."
    )
    spool_max_items: int = Field(
        100_000, ge=1, description="Most messages/shadow updates held for the controller."
    )
    spool_drop_policy: DropPolicy = Field(
        DropPolicy.DROP_OLDEST,
        description="When the spool is full: `drop-oldest` or `reject-newest` (both counted).",
    )
    spool_retry_interval_s: float = Field(
        5.0, gt=0, description="Seconds between delivery attempts of the spool."
    )
    dead_letter_topic: str = Field(
        "edgevisor/deadletter",
        description="Topic where unroutable messages go, with the reason, as JSON.",
    )
    reply_qos: int = Field(0, ge=0, le=1, description="QoS of replies, deltas, dead letters.")
    max_concurrent_calls: int = Field(
        256, ge=1, description="Most route-triggered task calls in flight at once."
    )
    reconnect_interval_s: float = Field(
        1.0, gt=0, description="Wait before reconnecting the agent's MQTT client."
    )
    agent_link: Literal["inprocess", "client"] = Field(
        "inprocess",
        description=(
            "How the agent reaches the embedded broker: `inprocess` (attached, no network "
            "hop) or `client` (TCP, as a privileged MQTT client). External brokers: client."
        ),
    )
