"""Volumes in the SDK: wire models, call descriptions, and the client mixins."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.sdk.calls import Call, _many, _none, _one
from edgevisor.sdk.models import HOST_PATTERN, NAME_PATTERN

T = TypeVar("T")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``1G``/``512M``/``4096``/``1GiB`` (binary units); ValueError if not."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 1G, 10G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VolumeCreate(_Request):
    name: str = Field(pattern=NAME_PATTERN, description="Volume name, unique in the account.")
    size: str | int = Field(description="Size in bytes, or with a unit: 512M, 1G, 10G.")
    host: str | None = Field(
        None, pattern=HOST_PATTERN, description="Host to place it on (empty: chosen)."
    )
    block_size: int | None = Field(None, description="Block size in bytes (power of two).")


class VolumeExportRequest(_Request):
    to: str = Field(pattern=HOST_PATTERN, description="The only host allowed to open it.")


class VolumeInfo(_Model):
    name: str
    account: str
    host: str
    size_bytes: int
    block_size: int
    exported_to: str | None = None
    created_at: float
    live: dict[str, Any] | None = Field(
        None, description="What the host reports (present bytes, lazy progress, role)."
    )


class VolumeExport(_Model):
    name: str
    host: str
    address: str
    port: int
    export: str
    peer: str
    uri: str = Field(description="nbds://address:port/export (TLS with fleet certificates).")


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def create_volume(
    name: str,
    size: str | int,
    *,
    host: str | None = None,
    block_size: int | None = None,
    account: str | None = None,
) -> Call[VolumeInfo]:
    body = {"name": name, "size": size, "host": host, "block_size": block_size}
    return Call("POST", "/v1/volumes", _one(VolumeInfo), json=body, params=_params(account=account))


def list_volumes(account: str | None = None) -> Call[list[VolumeInfo]]:
    return Call("GET", "/v1/volumes", _many(VolumeInfo), params=_params(account=account))


def get_volume(name: str, account: str | None = None) -> Call[VolumeInfo]:
    return Call("GET", f"/v1/volumes/{name}", _one(VolumeInfo), params=_params(account=account))


def remove_volume(name: str, account: str | None = None) -> Call[None]:
    return Call("DELETE", f"/v1/volumes/{name}", _none, params=_params(account=account))


def export_volume(name: str, to: str, account: str | None = None) -> Call[VolumeExport]:
    return Call(
        "POST",
        f"/v1/volumes/{name}/export",
        _one(VolumeExport),
        json={"to": to},
        params=_params(account=account),
    )


def unexport_volume(name: str, account: str | None = None) -> Call[None]:
    return Call("DELETE", f"/v1/volumes/{name}/export", _none, params=_params(account=account))


class VolumesMixin:
    """Volumes for :class:`edgevisor.Client`."""

    if TYPE_CHECKING:

        def call(self, call: Call[T]) -> T: ...

    def create_volume(self, name: str, size: str | int, **options: Any) -> VolumeInfo:
        """Create a volume (``size`` in bytes or ``1G``); options: host, block_size, account."""
        return self.call(create_volume(name, size, **options))

    def list_volumes(self, account: str | None = None) -> list[VolumeInfo]:
        return self.call(list_volumes(account))

    def get_volume(self, name: str, account: str | None = None) -> VolumeInfo:
        return self.call(get_volume(name, account))

    def remove_volume(self, name: str, account: str | None = None) -> None:
        self.call(remove_volume(name, account))

    def export_volume(self, name: str, to: str, account: str | None = None) -> VolumeExport:
        """Offer the volume over NBD/TLS to host ``to`` only."""
        return self.call(export_volume(name, to, account))

    def unexport_volume(self, name: str, account: str | None = None) -> None:
        self.call(unexport_volume(name, account))


class AsyncVolumesMixin:
    """Volumes for :class:`edgevisor.AsyncClient`."""

    if TYPE_CHECKING:

        async def call(self, call: Call[T]) -> T: ...

    async def create_volume(self, name: str, size: str | int, **options: Any) -> VolumeInfo:
        return await self.call(create_volume(name, size, **options))

    async def list_volumes(self, account: str | None = None) -> list[VolumeInfo]:
        return await self.call(list_volumes(account))

    async def get_volume(self, name: str, account: str | None = None) -> VolumeInfo:
        return await self.call(get_volume(name, account))

    async def remove_volume(self, name: str, account: str | None = None) -> None:
        await self.call(remove_volume(name, account))

    async def export_volume(self, name: str, to: str, account: str | None = None) -> VolumeExport:
        return await self.call(export_volume(name, to, account))

    async def unexport_volume(self, name: str, account: str | None = None) -> None:
        await self.call(unexport_volume(name, account))
