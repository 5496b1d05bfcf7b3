"""Preserved logical addresses in the SDK: wire models, call descriptions and mixins.

The controller answers with these models (``control/api_addresses.py``) and the clients
parse them, so server and SDK cannot drift. ``account`` parameters are for the admin
token; an account token acts on its own account and may leave them out.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.sdk.calls import Call, _many, _none, _one

T = TypeVar("T")

__all__ = [
    "AddressAllocate",
    "AddressBind",
    "AddressHistoryEntry",
    "AddressMove",
    "AddressRecord",
    "AddressRelease",
    "AddressesMixin",
    "AppliedReportIn",
    "AppliedState",
    "AsyncAddressesMixin",
    "HostRecords",
    "HostReportIn",
    "Network",
    "NetworkCreate",
    "PhysicalPool",
    "PhysicalPoolCreate",
    "RecordStatus",
]

RecordState = Literal["allocated", "bound", "preserved", "held", "released"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- requests ------------------------------------------------------------------------------


class NetworkCreate(_Request):
    name: str = Field(min_length=1, max_length=64, description="Network name in the account.")
    cidr: str = Field(description="IPv4 or IPv6 CIDR of logical addresses.")
    account: str | None = Field(None, description="Owner (admin only; default: the caller's).")
    gateway: str | None = Field(
        "first", description="`first` (reserve the first host address), an address, or null."
    )


class PhysicalPoolCreate(_Request):
    host_group: str = Field("default", min_length=1, max_length=64)
    cidr: str = Field(description="Addresses hosts of the group use between them.")
    gateway: str | None = None


class AddressAllocate(_Request):
    network: str = Field(description="Network of the account to allocate from.")
    address: str | None = Field(None, description="A specific address; empty: any free one.")
    account: str | None = None


class AddressBind(_Request):
    instance: str = Field(min_length=1, max_length=128, description="Instance using it.")
    host: str = Field(min_length=1, max_length=64, description="Host the instance runs on.")
    account: str | None = None
    expected_generation: int | None = Field(None, ge=1, description="Compare-and-set guard.")


class AddressRelease(_Request):
    account: str | None = None
    hold_down_s: float | None = Field(None, ge=0, description="Default: the setting.")
    expected_generation: int | None = Field(None, ge=1)


class AddressMove(_Request):
    host: str = Field(min_length=1, max_length=64, description="The host taking over.")
    account: str | None = None
    expected_generation: int | None = Field(None, ge=1)


class AccountOnly(_Request):
    account: str | None = None
    expected_generation: int | None = Field(None, ge=1)


class AppliedReportIn(_Request):
    record_id: int
    generation: int = Field(ge=0)
    error: str | None = None


class HostReportIn(_Request):
    reports: list[AppliedReportIn] = Field(default_factory=list)
    instances: list[str] | None = Field(
        None, description="Instances the host runs (leak collection); null: not reported."
    )


# --- responses -----------------------------------------------------------------------------


class Network(_Model):
    account: str
    name: str
    cidr: str
    family: int
    gateway: str | None
    size: int
    assignable: int


class PhysicalPool(_Model):
    host_group: str
    cidr: str
    family: int
    gateway: str | None
    size: int
    assignable: int


class AddressRecord(_Model):
    id: int
    account: str
    network_id: int
    logical: str
    physical: str | None
    host: str | None
    instance: str | None
    state: RecordState
    generation: int
    held_until: datetime | None = None
    created_at: datetime
    updated_at: datetime


class AddressHistoryEntry(_Model):
    id: int
    record_id: int
    account: str
    address: str
    event: str
    from_state: RecordState | None
    to_state: RecordState
    instance: str | None
    host: str | None
    physical: str | None
    generation: int
    at: datetime


class AppliedState(_Model):
    host: str
    generation: int
    error: str | None = None
    at: datetime


class RecordStatus(_Model):
    record: AddressRecord
    needed_by: list[str]
    applied: list[AppliedState]
    drift: list[str] = Field(description="Hosts that need it and lag behind its generation.")


class HostRecords(_Model):
    host: str
    records: list[AddressRecord]
    removed: list[AddressRecord] = Field(
        default_factory=list,
        description="Records this host applied before that it must no longer translate.",
    )


# --- calls ---------------------------------------------------------------------------------


def _q(**params: Any) -> dict[str, Any] | None:
    out = {k: v for k, v in params.items() if v is not None}
    return out or None


def _body(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_none=True)


def create_network(
    name: str, cidr: str, *, account: str | None = None, gateway: str | None = "first"
) -> Call[Network]:
    body = NetworkCreate(name=name, cidr=cidr, account=account, gateway=gateway)
    return Call("POST", "/v1/networks", _one(Network), json=body.model_dump())


def list_networks(account: str | None = None) -> Call[list[Network]]:
    return Call("GET", "/v1/networks", _many(Network), params=_q(account=account))


def delete_network(name: str, account: str | None = None) -> Call[None]:
    return Call("DELETE", f"/v1/networks/{name}", _none, params=_q(account=account))


def create_physical_pool(
    cidr: str, host_group: str = "default", gateway: str | None = None
) -> Call[PhysicalPool]:
    body = PhysicalPoolCreate(host_group=host_group, cidr=cidr, gateway=gateway)
    return Call("POST", "/v1/physical-pools", _one(PhysicalPool), json=_body(body))


def list_physical_pools() -> Call[list[PhysicalPool]]:
    return Call("GET", "/v1/physical-pools", _many(PhysicalPool))


def allocate_address(
    network: str, address: str | None = None, *, account: str | None = None
) -> Call[AddressRecord]:
    body = AddressAllocate(network=network, address=address, account=account)
    return Call("POST", "/v1/addresses", _one(AddressRecord), json=_body(body))


def bind_address(
    ref: str | int, instance: str, host: str, *, account: str | None = None,
    expected_generation: int | None = None,
) -> Call[AddressRecord]:
    body = AddressBind(instance=instance, host=host, account=account,
                       expected_generation=expected_generation)
    return Call("POST", f"/v1/addresses/{ref}/bind", _one(AddressRecord), json=_body(body))


def claim_address(
    ref: str | int, instance: str, host: str, *, account: str | None = None,
    expected_generation: int | None = None,
) -> Call[AddressRecord]:
    body = AddressBind(instance=instance, host=host, account=account,
                       expected_generation=expected_generation)
    return Call("POST", f"/v1/addresses/{ref}/claim", _one(AddressRecord), json=_body(body))


def preserve_address(
    ref: str | int, *, account: str | None = None, expected_generation: int | None = None
) -> Call[AddressRecord]:
    body = AccountOnly(account=account, expected_generation=expected_generation)
    return Call("POST", f"/v1/addresses/{ref}/preserve", _one(AddressRecord), json=_body(body))


def release_address(
    ref: str | int, *, account: str | None = None, hold_down_s: float | None = None,
    expected_generation: int | None = None,
) -> Call[AddressRecord]:
    body = AddressRelease(account=account, hold_down_s=hold_down_s,
                          expected_generation=expected_generation)
    return Call("POST", f"/v1/addresses/{ref}/release", _one(AddressRecord), json=_body(body))


def move_address(
    ref: str | int, host: str, *, account: str | None = None,
    expected_generation: int | None = None,
) -> Call[AddressRecord]:
    body = AddressMove(host=host, account=account, expected_generation=expected_generation)
    return Call("POST", f"/v1/addresses/{ref}/move", _one(AddressRecord), json=_body(body))


def list_addresses(
    account: str | None = None, network: str | None = None, state: str | None = None
) -> Call[list[AddressRecord]]:
    return Call("GET", "/v1/addresses", _many(AddressRecord),
                params=_q(account=account, network=network, state=state))


def get_address(ref: str | int, account: str | None = None) -> Call[AddressRecord]:
    return Call("GET", f"/v1/addresses/{ref}", _one(AddressRecord), params=_q(account=account))


def address_history(
    ref: str | int, account: str | None = None
) -> Call[list[AddressHistoryEntry]]:
    return Call("GET", f"/v1/addresses/{ref}/history", _many(AddressHistoryEntry),
                params=_q(account=account))


def list_records(
    account: str | None = None, host: str | None = None
) -> Call[list[RecordStatus]]:
    return Call("GET", "/v1/records", _many(RecordStatus), params=_q(account=account, host=host))


# --- client mixins -------------------------------------------------------------------------

if TYPE_CHECKING:
    from collections.abc import Awaitable

    class _SyncBase:
        def call(self, call: Call[T]) -> T: ...

    class _AsyncBase:
        def call(self, call: Call[T]) -> Awaitable[T]: ...
else:
    _SyncBase = object
    _AsyncBase = object


class AddressesMixin(_SyncBase):
    """Networks, addresses and records for :class:`edgevisor.Client`."""

    def create_network(
        self, name: str, cidr: str, *, account: str | None = None, gateway: str | None = "first"
    ) -> Network:
        return self.call(create_network(name, cidr, account=account, gateway=gateway))

    def list_networks(self, account: str | None = None) -> list[Network]:
        return self.call(list_networks(account))

    def delete_network(self, name: str, account: str | None = None) -> None:
        return self.call(delete_network(name, account))

    def create_physical_pool(
        self, cidr: str, host_group: str = "default", gateway: str | None = None
    ) -> PhysicalPool:
        return self.call(create_physical_pool(cidr, host_group, gateway))

    def list_physical_pools(self) -> list[PhysicalPool]:
        return self.call(list_physical_pools())

    def allocate_address(
        self, network: str, address: str | None = None, *, account: str | None = None
    ) -> AddressRecord:
        return self.call(allocate_address(network, address, account=account))

    def bind_address(
        self, ref: str | int, instance: str, host: str, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return self.call(bind_address(ref, instance, host, account=account,
                                      expected_generation=expected_generation))

    def claim_address(
        self, ref: str | int, instance: str, host: str, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return self.call(claim_address(ref, instance, host, account=account,
                                       expected_generation=expected_generation))

    def preserve_address(
        self, ref: str | int, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return self.call(preserve_address(ref, account=account,
                                          expected_generation=expected_generation))

    def release_address(
        self, ref: str | int, *, account: str | None = None, hold_down_s: float | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return self.call(release_address(ref, account=account, hold_down_s=hold_down_s,
                                         expected_generation=expected_generation))

    def move_address(
        self, ref: str | int, host: str, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return self.call(move_address(ref, host, account=account,
                                      expected_generation=expected_generation))

    def list_addresses(
        self, account: str | None = None, network: str | None = None, state: str | None = None
    ) -> list[AddressRecord]:
        return self.call(list_addresses(account, network, state))

    def get_address(self, ref: str | int, account: str | None = None) -> AddressRecord:
        return self.call(get_address(ref, account))

    def address_history(
        self, ref: str | int, account: str | None = None
    ) -> list[AddressHistoryEntry]:
        return self.call(address_history(ref, account))

    def list_records(
        self, account: str | None = None, host: str | None = None
    ) -> list[RecordStatus]:
        return self.call(list_records(account, host))


class AsyncAddressesMixin(_AsyncBase):
    """The same methods for :class:`edgevisor.AsyncClient`, awaited."""

    async def create_network(
        self, name: str, cidr: str, *, account: str | None = None, gateway: str | None = "first"
    ) -> Network:
        return await self.call(create_network(name, cidr, account=account, gateway=gateway))

    async def list_networks(self, account: str | None = None) -> list[Network]:
        return await self.call(list_networks(account))

    async def delete_network(self, name: str, account: str | None = None) -> None:
        return await self.call(delete_network(name, account))

    async def create_physical_pool(
        self, cidr: str, host_group: str = "default", gateway: str | None = None
    ) -> PhysicalPool:
        return await self.call(create_physical_pool(cidr, host_group, gateway))

    async def list_physical_pools(self) -> list[PhysicalPool]:
        return await self.call(list_physical_pools())

    async def allocate_address(
        self, network: str, address: str | None = None, *, account: str | None = None
    ) -> AddressRecord:
        return await self.call(allocate_address(network, address, account=account))

    async def bind_address(
        self, ref: str | int, instance: str, host: str, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return await self.call(bind_address(ref, instance, host, account=account,
                                            expected_generation=expected_generation))

    async def claim_address(
        self, ref: str | int, instance: str, host: str, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return await self.call(claim_address(ref, instance, host, account=account,
                                             expected_generation=expected_generation))

    async def preserve_address(
        self, ref: str | int, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return await self.call(preserve_address(ref, account=account,
                                                expected_generation=expected_generation))

    async def release_address(
        self, ref: str | int, *, account: str | None = None, hold_down_s: float | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return await self.call(release_address(ref, account=account, hold_down_s=hold_down_s,
                                               expected_generation=expected_generation))

    async def move_address(
        self, ref: str | int, host: str, *, account: str | None = None,
        expected_generation: int | None = None,
    ) -> AddressRecord:
        return await self.call(move_address(ref, host, account=account,
                                            expected_generation=expected_generation))

    async def list_addresses(
        self, account: str | None = None, network: str | None = None, state: str | None = None
    ) -> list[AddressRecord]:
        return await self.call(list_addresses(account, network, state))

    async def get_address(self, ref: str | int, account: str | None = None) -> AddressRecord:
        return await self.call(get_address(ref, account))

    async def address_history(
        self, ref: str | int, account: str | None = None
    ) -> list[AddressHistoryEntry]:
        return await self.call(address_history(ref, account))

    async def list_records(
        self, account: str | None = None, host: str | None = None
    ) -> list[RecordStatus]:
        return await self.call(list_records(account, host))
