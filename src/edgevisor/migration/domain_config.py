"""Settings of domains on an agent (section ``domains``); pydantic only, cheap to import."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DomainsSettings"]


class DomainsSettings(BaseModel):
    """Domains on an agent (section ``domains``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    volume_mount: str = Field("/data", description="Where a domain sees its volume.")
    memory_mb: int = Field(256, gt=8, description="Default memory limit of a domain.")
    cpu: float = Field(1.0, ge=0, description="Default CPU share of a domain (0: unlimited).")
    pids_max: int = Field(256, gt=1, description="Default process limit of a domain.")
    tmp_mb: int = Field(64, gt=0, description="Size of a domain's private /tmp.")
    start_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the sandbox.")
    stop_timeout_s: float = Field(
        20.0, gt=0, description="Longest wait for a domain's processes and mounts to go."
    )
    backoff_initial_s: float = Field(
        0.5, gt=0, description="First delay before a restart by policy; doubles each time."
    )
    backoff_max_s: float = Field(30.0, gt=0, description="Largest delay between restarts.")
    backoff_reset_s: float = Field(
        60.0, gt=0, description="A run this long resets the backoff to its initial delay."
    )
    max_restarts: int = Field(
        0, ge=0, description="Consecutive failed restarts before giving up (0: never give up)."
    )
    test_subnet: str = Field(
        "169.254.192.0/20",
        description=(
            "Link-local addresses for domains until the addressing work assigns logical "
            "ones: each domain holds one /32 of it, reachable from its host over its veth."
        ),
    )
    log_max_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="A domain's log (stdout+stderr) past this size moves to domain.log.1 at "
        "the domain's next (re)start.",
    )
    app_max_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest app archive a domain may be given."
    )
    quiesce_cleanup_delay_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="After a quiesce, wait this long before detaching the volume's loop "
        "device and FUSE process (anything that needs them gone waits for it). 0 on real "
        "hosts; a single machine simulating several hosts sets it so the source's cleanup "
        "does not compete with the target's start for the same CPUs.",
    )
    fill_hold_s: float = Field(
        0.0,
        ge=0,
        le=30,
        description="After a migration's switch, the target keeps the background fill at "
        "its trickle until the domain listens on a TCP port, or this long at most, so the "
        "domain's start-up (its on-demand reads, its CPU) does not compete with the fill. "
        "0 (default: no gain measured, and the hold delays the sync): the fill starts at "
        "full rate right after the switch.",
    )
