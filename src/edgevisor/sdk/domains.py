"""Domains in the SDK: wire models, call descriptions, and the client mixins."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgevisor.errors import RequestError
from edgevisor.sdk.calls import Call, _many, _none, _one
from edgevisor.sdk.models import HOST_PATTERN
from edgevisor.sdk.tasks import pack_bundle
from edgevisor.sdk.volumes import parse_size

T = TypeVar("T")
DOMAIN_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
RestartPolicy = Literal["never", "on-failure", "always"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class DomainCreate(BaseModel):
    """The body of ``POST /v1/domains``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=DOMAIN_PATTERN, description="Domain name, unique in the account.")
    command: list[str] = Field(min_length=1, description="argv run inside the domain.")
    volume_size: str | int = Field(description="Volume size in bytes or with a unit: 1G.")
    host: str | None = Field(None, pattern=HOST_PATTERN, description="Host (empty: chosen).")
    restart: RestartPolicy = Field("on-failure", description="Restart policy on its host.")
    memory_mb: int | None = Field(None, gt=8, description="Memory limit (agent default).")
    cpu: float | None = Field(None, ge=0, description="CPU share of one core (0: no limit).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables.")
    app_b64: str | None = Field(
        None, description="App files as a base64 .tar.gz, read-only at /task (the cwd)."
    )
    network: str | None = Field(
        None, description="Network of the account the domain takes its logical address from."
    )
    address: str | None = Field(
        None, description="A specific logical address in ``network`` (empty: any free one)."
    )
    claim: str | None = Field(
        None, description="A preserved address of the account to claim (address or record id)."
    )


class DomainInfo(_Model):
    name: str
    account: str
    host: str
    command: list[str]
    volume: str = Field(description="The volume's name in the account.")
    volume_size_bytes: int
    restart: str
    memory_mb: int
    cpu: float
    role: str = Field(description="The volume's role on the host: primary|secondary.")
    phase: str = Field(
        description="creating|stopped|starting|running|frozen|backoff|exited|failed|stopping"
    )
    desired: str = Field(description="running|stopped")
    restart_count: int
    address: str | None = Field(
        None,
        description="The domain's logical address (with ``network``), else the test address "
        "its host reaches it at.",
    )
    network: str | None = Field(None, description="Network of the logical address, if any.")
    address_record_id: int | None = Field(None, description="Its address record, if any.")
    app_digest: str | None = Field(None, description="SHA-256 of the app archive, if any.")
    created_at: float
    updated_at: float
    live: dict[str, Any] | None = Field(None, description="What the host reports now.")


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def create_domain(body: DomainCreate, account: str | None = None) -> Call[DomainInfo]:
    return Call(
        "POST", "/v1/domains", _one(DomainInfo), json=body.model_dump(mode="json"),
        params=_params(account=account),
    )  # fmt: skip


def list_domains() -> Call[list[DomainInfo]]:
    return Call("GET", "/v1/domains", _many(DomainInfo))


def get_domain(name: str, account: str | None = None) -> Call[DomainInfo]:
    return Call("GET", f"/v1/domains/{name}", _one(DomainInfo), params=_params(account=account))


def _action(name: str, action: str, account: str | None) -> Call[DomainInfo]:
    return Call(
        "POST", f"/v1/domains/{name}/{action}", _one(DomainInfo), params=_params(account=account)
    )


def start_domain(name: str, account: str | None = None) -> Call[DomainInfo]:
    return _action(name, "start", account)


def stop_domain(name: str, account: str | None = None) -> Call[DomainInfo]:
    return _action(name, "stop", account)


def remove_domain(
    name: str, account: str | None = None, *, release: bool = False
) -> Call[None]:
    params = _params(account=account, release="true" if release else None)
    return Call("DELETE", f"/v1/domains/{name}", _none, params=params)


def domain_body(
    name: str,
    command: list[str],
    volume_size: str | int,
    *,
    app: Path | bytes | None = None,
    **options: Any,
) -> DomainCreate:
    """A create request; ``app`` is a directory or .tar.gz (path or bytes)."""
    try:
        parse_size(volume_size)  # fail here, before the request, on a bad size
        app_b64 = None
        if app is not None:
            data = app if isinstance(app, bytes) else pack_bundle(Path(app))
            app_b64 = base64.b64encode(data).decode()
        return DomainCreate(
            name=name, command=command, volume_size=volume_size, app_b64=app_b64, **options
        )
    except ValidationError as exc:
        raise RequestError(f"invalid domain: {exc}") from exc
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


class DomainsMixin:
    """Domains for :class:`edgevisor.Client`."""

    if TYPE_CHECKING:

        def call(self, call: Call[T]) -> T: ...

    def create_domain(
        self,
        name: str,
        command: list[str],
        volume_size: str | int,
        *,
        account: str | None = None,
        app: Path | bytes | None = None,
        **options: Any,
    ) -> DomainInfo:
        """Create and start a domain (options: host, restart, memory_mb, cpu, env, and for
        a logical address network [+ address] or claim)."""
        body = domain_body(name, command, volume_size, app=app, **options)
        return self.call(create_domain(body, account))

    def list_domains(self) -> list[DomainInfo]:
        return self.call(list_domains())

    def get_domain(self, name: str, account: str | None = None) -> DomainInfo:
        return self.call(get_domain(name, account))

    def start_domain(self, name: str, account: str | None = None) -> DomainInfo:
        return self.call(start_domain(name, account))

    def stop_domain(self, name: str, account: str | None = None) -> DomainInfo:
        return self.call(stop_domain(name, account))

    def remove_domain(
        self, name: str, account: str | None = None, *, release: bool = False
    ) -> None:
        """Remove a domain; its logical address is preserved unless ``release``."""
        self.call(remove_domain(name, account, release=release))


class AsyncDomainsMixin:
    """Domains for :class:`edgevisor.AsyncClient`."""

    if TYPE_CHECKING:

        async def call(self, call: Call[T]) -> T: ...

    async def create_domain(
        self,
        name: str,
        command: list[str],
        volume_size: str | int,
        *,
        account: str | None = None,
        app: Path | bytes | None = None,
        **options: Any,
    ) -> DomainInfo:
        body = domain_body(name, command, volume_size, app=app, **options)
        return await self.call(create_domain(body, account))

    async def list_domains(self) -> list[DomainInfo]:
        return await self.call(list_domains())

    async def get_domain(self, name: str, account: str | None = None) -> DomainInfo:
        return await self.call(get_domain(name, account))

    async def start_domain(self, name: str, account: str | None = None) -> DomainInfo:
        return await self.call(start_domain(name, account))

    async def stop_domain(self, name: str, account: str | None = None) -> DomainInfo:
        return await self.call(stop_domain(name, account))

    async def remove_domain(
        self, name: str, account: str | None = None, *, release: bool = False
    ) -> None:
        await self.call(remove_domain(name, account, release=release))
