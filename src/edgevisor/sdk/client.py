"""``edgevisor.Client`` and ``edgevisor.AsyncClient``: the HTTP API over httpx.

Both execute the call descriptions in :mod:`edgevisor.sdk.calls`, so they cannot drift.
Errors come back as the same classes the controller raised (``NotFound``, ...).
Each capability adds its methods as a pair of mixins (``sdk/<capability>.py``: a sync one
whose methods return ``self.call(...)`` and an async one that awaits it).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from edgevisor.errors import EdgevisorError, PeerUnavailable, Unauthorized, from_payload
from edgevisor.sdk import calls
from edgevisor.sdk import models as m
from edgevisor.sdk.addresses import AddressesMixin, AsyncAddressesMixin
from edgevisor.sdk.calls import Call
from edgevisor.sdk.devices import AsyncDevicesMixin, DevicesMixin
from edgevisor.sdk.domains import AsyncDomainsMixin, DomainsMixin
from edgevisor.sdk.migrations import AsyncMigrationsMixin, MigrationsMixin
from edgevisor.sdk.tasks import AsyncTasksMixin, TasksMixin
from edgevisor.sdk.volumes import AsyncVolumesMixin, VolumesMixin

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:7450"


def default_token_paths() -> list[Path]:
    """Where ``edgevisor up`` writes the admin token on this machine."""
    import platformdirs

    paths = [Path("/var/lib/edgevisor/admin.token")] if os.geteuid() == 0 else []
    paths.append(Path(platformdirs.user_state_dir("edgevisor")) / "admin.token")
    return paths


def resolve(url: str | None, token: str | None) -> tuple[str, str | None]:
    """URL and token from arguments, then EDGEVISOR_URL/EDGEVISOR_TOKEN, then defaults."""
    url = url or os.environ.get("EDGEVISOR_URL") or DEFAULT_URL
    token = token or os.environ.get("EDGEVISOR_TOKEN")
    if not token:
        for path in default_token_paths():
            try:
                token = path.read_text().strip()
                break
            except OSError:
                continue
    return url.rstrip("/"), token


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _result(call: Call[T], resp: httpx.Response) -> T:
    if resp.status_code >= 400:
        try:
            payload: Any = resp.json()
        except ValueError:
            payload = resp.text
        raise from_payload(resp.status_code, payload)
    body = resp.json() if resp.content else None
    return call.parse(body)


def _sse_events(lines: Iterator[str]) -> Iterator[m.EventRecord]:
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield m.EventRecord.model_validate(json.loads("\n".join(data)))
            data = []


def _transport_error(url: str, exc: httpx.TransportError) -> EdgevisorError:
    return PeerUnavailable(f"controller at {url} is unreachable: {exc}")


class Client(
    TasksMixin, AddressesMixin, VolumesMixin, DevicesMixin, DomainsMixin, MigrationsMixin
):
    """Synchronous client. ``Client()`` finds the local controller and admin token."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.url, self.token = resolve(url, token)
        self._http = httpx.Client(
            base_url=self.url, headers=_headers(self.token), timeout=timeout_s
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, call: Call[T]) -> T:
        try:
            resp = self._http.request(
                call.method,
                call.path,
                json=call.json,
                params=call.params,
                content=call.content,
                headers=call.headers,
            )
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc
        return _result(call, resp)

    def health(self) -> m.Health:
        return self.call(calls.health())

    def whoami(self) -> m.Whoami:
        return self.call(calls.whoami())

    def create_account(self, name: str) -> m.Account:
        return self.call(calls.create_account(name))

    def list_accounts(self) -> list[m.Account]:
        return self.call(calls.list_accounts())

    def get_account(self, name: str) -> m.Account:
        return self.call(calls.get_account(name))

    def delete_account(self, name: str) -> None:
        self.call(calls.delete_account(name))

    def create_token(self, account: str | None = None, name: str = "default") -> m.TokenCreated:
        return self.call(calls.create_token(account, name))

    def list_tokens(self) -> list[m.TokenInfo]:
        return self.call(calls.list_tokens())

    def revoke_token(self, token_id: int) -> m.TokenInfo:
        return self.call(calls.revoke_token(token_id))

    def create_join_token(
        self, host: str | None = None, ttl_s: float | None = None
    ) -> m.JoinTokenCreated:
        return self.call(calls.create_join_token(host, ttl_s))

    def list_hosts(self) -> list[m.Host]:
        return self.call(calls.list_hosts())

    def get_host(self, name: str) -> m.Host:
        return self.call(calls.get_host(name))

    def remove_host(self, name: str) -> None:
        self.call(calls.remove_host(name))

    def recent_events(self, after: int = 0) -> list[m.EventRecord]:
        return self.call(calls.recent_events(after))

    def events(self, after: int | None = None) -> Iterator[m.EventRecord]:
        """Follow the event stream (SSE) until the caller stops iterating."""
        params = {"after": after} if after is not None else {}
        try:
            with self._http.stream("GET", "/v1/events", params=params, timeout=None) as resp:
                if resp.status_code == 401:
                    raise Unauthorized("token is not valid or was revoked")
                yield from _sse_events(resp.iter_lines())
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc


class AsyncClient(
    AsyncTasksMixin, AsyncAddressesMixin, AsyncVolumesMixin, AsyncDevicesMixin,
    AsyncDomainsMixin, AsyncMigrationsMixin,
):
    """Asynchronous client with the same methods as :class:`Client`, awaited."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.url, self.token = resolve(url, token)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(self.token), timeout=timeout_s
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, call: Call[T]) -> T:
        try:
            resp = await self._http.request(
                call.method,
                call.path,
                json=call.json,
                params=call.params,
                content=call.content,
                headers=call.headers,
            )
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc
        return _result(call, resp)

    async def health(self) -> m.Health:
        return await self.call(calls.health())

    async def whoami(self) -> m.Whoami:
        return await self.call(calls.whoami())

    async def create_account(self, name: str) -> m.Account:
        return await self.call(calls.create_account(name))

    async def list_accounts(self) -> list[m.Account]:
        return await self.call(calls.list_accounts())

    async def get_account(self, name: str) -> m.Account:
        return await self.call(calls.get_account(name))

    async def delete_account(self, name: str) -> None:
        await self.call(calls.delete_account(name))

    async def create_token(
        self, account: str | None = None, name: str = "default"
    ) -> m.TokenCreated:
        return await self.call(calls.create_token(account, name))

    async def list_tokens(self) -> list[m.TokenInfo]:
        return await self.call(calls.list_tokens())

    async def revoke_token(self, token_id: int) -> m.TokenInfo:
        return await self.call(calls.revoke_token(token_id))

    async def create_join_token(
        self, host: str | None = None, ttl_s: float | None = None
    ) -> m.JoinTokenCreated:
        return await self.call(calls.create_join_token(host, ttl_s))

    async def list_hosts(self) -> list[m.Host]:
        return await self.call(calls.list_hosts())

    async def get_host(self, name: str) -> m.Host:
        return await self.call(calls.get_host(name))

    async def remove_host(self, name: str) -> None:
        await self.call(calls.remove_host(name))

    async def recent_events(self, after: int = 0) -> list[m.EventRecord]:
        return await self.call(calls.recent_events(after))

    async def events(self, after: int | None = None) -> AsyncIterator[m.EventRecord]:
        params = {"after": after} if after is not None else {}
        try:
            async with self._http.stream(
                "GET", "/v1/events", params=params, timeout=None
            ) as resp:
                if resp.status_code == 401:
                    raise Unauthorized("token is not valid or was revoked")
                data: list[str] = []
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif line == "" and data:
                        yield m.EventRecord.model_validate(json.loads("\n".join(data)))
                        data = []
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from exc
