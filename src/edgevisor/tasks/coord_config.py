"""Settings of the coordinator on one host (section ``coordinator`` of the settings)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CoordinatorSettings"]


class CoordinatorSettings(BaseModel):
    """Settings of the coordinator on one host (section ``coordinator``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mb: int = Field(1024, gt=0, description="Memory budget for all environments, MiB.")
    cpu: float = Field(2.0, gt=0, description="CPU budget for running calls, in cores.")
    max_envs: int = Field(32, gt=0, description="Most environments alive at once.")
    queue_bound: int = Field(
        10_000, gt=0, description="Pending calls past which a call is refused with 429."
    )
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with a 429.")
    payload_limit_bytes: int = Field(
        1_048_576, gt=0, description="Largest event (JSON-encoded); larger ones get 413."
    )
    log_cap_bytes: int = Field(65_536, gt=0, description="Logs kept per call, bytes.")
    aging_s: float = Field(
        10.0,
        gt=0,
        description="A call waiting this long no longer lets smaller calls pass it.",
    )
    keep_warm_idle_s: float = Field(
        300.0, ge=0, description="Keep-warm idle time for tasks whose manifest sets none."
    )
    housekeep_interval_s: float = Field(
        1.0, gt=0, description="Longest sleep of the keep-warm/prewarm timer."
    )
    records_kept: int = Field(
        10_000, gt=0, description="Finished call records kept in memory (older: journal)."
    )
    journal_delay_s: float = Field(
        0.05, ge=0, description="How long lazily journaled rows gather before a commit."
    )
    journal_sync_calls: bool = Field(
        True, description="Also journal finished sync calls (lazily, in batches) for history."
    )
    journal_retention_s: float = Field(
        7 * 86_400.0, gt=0, description="Finished calls older than this leave the journal."
    )
    bundle_max_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="Largest unpacked bundle, bytes."
    )
    validate_on_deploy: bool = Field(
        True,
        description="Start an environment at deploy so a bundle that fails to load is refused.",
    )
