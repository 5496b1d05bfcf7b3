"""The ``storage`` settings section: the agent's NBD endpoint, lazy volumes, attachments.

The section gathers the settings models the storage modules define, so one frozen tree
configures the volumes capability (:mod:`edgevisor.agent.volumes`). TLS material for the
NBD endpoint is not configured here: the agent uses its fleet host certificate
(:mod:`edgevisor.pki`), so the ``tls_*`` fields of ``storage.nbd`` stay empty for agents.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.storage.hostfs import AttachSettings
from edgevisor.storage.lazy import LazySettings
from edgevisor.storage.nbd_server import NBDServerSettings

__all__ = ["StorageSettings"]


def _agent_nbd() -> NBDServerSettings:
    # Port 0 by default: several agents share one machine in tests and `up`; each
    # export reports the port it is reachable on, so peers need no fixed number.
    return NBDServerSettings(listen_host="127.0.0.1", listen_port=0)


class StorageSettings(BaseModel):
    """Volumes on this host (``storage`` section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    volumes_dir: str | None = Field(
        None, description="Where volumes live (empty: <data_dir>/agent/<host>/volumes)."
    )
    nbd: NBDServerSettings = Field(
        default_factory=_agent_nbd,
        description="The agent's NBD endpoint for links between hosts (TLS, port 0: any).",
    )
    nbd_advertise_address: str | None = Field(
        None,
        description=(
            "Address peers use to reach the NBD endpoint (empty: the listen address, or the "
            "host's physical address when listening on every interface)."
        ),
    )
    lazy: LazySettings = Field(
        default_factory=LazySettings, description="Lazy (post-copy) volumes."
    )
    attach: AttachSettings = Field(
        default_factory=AttachSettings, description="Volumes mounted as filesystems."
    )
    default_block_size_bytes: int = Field(
        65536, ge=4096, le=1 << 22, description="Block size of new volumes."
    )
    max_volume_bytes: int = Field(
        1 << 42, ge=1 << 20, description="Largest volume this host creates (4 TiB)."
    )
