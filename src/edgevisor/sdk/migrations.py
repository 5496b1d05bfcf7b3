"""Migrations in the SDK: wire models, call descriptions, and the client mixins.

A migration moves a running domain to another host (post-copy: switch first, then sync
the volume; or the ``stop-and-copy`` baseline). ``migrate_domain`` starts one and returns
at once; ``get_migration`` / ``domain_migration`` poll it; ``abort_migration`` rolls it
back (refused after the commit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.sdk.calls import Call, _many, _one
from edgevisor.sdk.models import HOST_PATTERN

T = TypeVar("T")
MigrationMode = Literal["post-copy", "stop-and-copy"]
FINAL = frozenset({"committed", "aborted", "failed_back"})


class MigrationCreate(BaseModel):
    """The body of ``POST /v1/migrations``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str = Field(description="The domain to move (in the caller's account).")
    to: str = Field(pattern=HOST_PATTERN, description="Target host.")
    mode: MigrationMode = Field("post-copy", description="post-copy or stop-and-copy.")
    rate_bytes_s: int | None = Field(
        None, gt=0, description="Limit of the background fill in bytes/s (none: unlimited)."
    )


class MigrationInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    domain: str
    account: str
    source: str
    target: str
    mode: str
    phase: str = Field(
        description="requested|preparing|switching|post_sync|verifying|committed|"
        "aborting|aborted|failed_back"
    )
    present_bytes: int = Field(description="Bytes on the target; never goes backwards.")
    total_bytes: int
    rate_bytes_s: float | None = None
    eta_s: float | None = None
    downtime_s: float | None = Field(
        None, description="From quiescing the source to the domain running on the target."
    )
    blocked_on: str | None = Field(None, description="A host the migration waits for.")
    cause: str | None = Field(None, description="abort|fault|restart when rolling back.")
    reason: str | None = None
    settled: bool = Field(description="Final, and nothing left to clean up.")
    created_at: float
    updated_at: float

    @property
    def final(self) -> bool:
        return self.phase in FINAL


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def migrate_domain(body: MigrationCreate, account: str | None = None) -> Call[MigrationInfo]:
    return Call(
        "POST", "/v1/migrations", _one(MigrationInfo), json=body.model_dump(mode="json"),
        params=_params(account=account),
    )  # fmt: skip


def list_migrations(account: str | None = None) -> Call[list[MigrationInfo]]:
    return Call("GET", "/v1/migrations", _many(MigrationInfo), params=_params(account=account))


def get_migration(migration_id: str) -> Call[MigrationInfo]:
    return Call("GET", f"/v1/migrations/{migration_id}", _one(MigrationInfo))


def domain_migration(name: str, account: str | None = None) -> Call[MigrationInfo]:
    """The domain's current (or last) migration."""
    return Call(
        "GET", f"/v1/domains/{name}/migration", _one(MigrationInfo),
        params=_params(account=account),
    )  # fmt: skip


def abort_migration(migration_id: str) -> Call[MigrationInfo]:
    return Call("POST", f"/v1/migrations/{migration_id}/abort", _one(MigrationInfo))


class MigrationsMixin:
    """Migrations for :class:`edgevisor.Client`."""

    if TYPE_CHECKING:

        def call(self, call: Call[T]) -> T: ...

    def migrate_domain(
        self,
        name: str,
        to: str,
        *,
        mode: MigrationMode = "post-copy",
        rate_bytes_s: int | None = None,
        account: str | None = None,
    ) -> MigrationInfo:
        body = MigrationCreate(domain=name, to=to, mode=mode, rate_bytes_s=rate_bytes_s)
        return self.call(migrate_domain(body, account))

    def list_migrations(self, account: str | None = None) -> list[MigrationInfo]:
        return self.call(list_migrations(account))

    def get_migration(self, migration_id: str) -> MigrationInfo:
        return self.call(get_migration(migration_id))

    def domain_migration(self, name: str, account: str | None = None) -> MigrationInfo:
        return self.call(domain_migration(name, account))

    def abort_migration(self, migration_id: str) -> MigrationInfo:
        return self.call(abort_migration(migration_id))


class AsyncMigrationsMixin:
    """Migrations for :class:`edgevisor.AsyncClient`."""

    if TYPE_CHECKING:

        async def call(self, call: Call[T]) -> T: ...

    async def migrate_domain(
        self,
        name: str,
        to: str,
        *,
        mode: MigrationMode = "post-copy",
        rate_bytes_s: int | None = None,
        account: str | None = None,
    ) -> MigrationInfo:
        body = MigrationCreate(domain=name, to=to, mode=mode, rate_bytes_s=rate_bytes_s)
        return await self.call(migrate_domain(body, account))

    async def list_migrations(self, account: str | None = None) -> list[MigrationInfo]:
        return await self.call(list_migrations(account))

    async def get_migration(self, migration_id: str) -> MigrationInfo:
        return await self.call(get_migration(migration_id))

    async def domain_migration(self, name: str, account: str | None = None) -> MigrationInfo:
        return await self.call(domain_migration(name, account))

    async def abort_migration(self, migration_id: str) -> MigrationInfo:
        return await self.call(abort_migration(migration_id))
