"""Coordinated devices in the SDK: devices, routes, timers, shadows, device messages and
deployments — wire models, call descriptions, and the client mixins."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.errors import RequestError
from edgevisor.sdk.calls import Call, _many, _none, _one
from edgevisor.sdk.tasks import pack_bundle

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class DeviceInfo(_Model):
    name: str
    account: str
    host: str
    username: str = Field(description="MQTT username: <account>.<device>.")
    created_at: float


class DeviceTLS(_Model):
    """A device's client certificate, from the host's devices CA; the key is shown once."""

    url: str | None = Field(None, description="The broker's TLS listener, mqtts://host:port.")
    key_pem: str | None = Field(
        None,
        description="The device's private key (PEM), shown only once; none when the device "
        "sent its own CSR (its key never left it).",
    )
    cert_pem: str = Field(description="The device's certificate (PEM), CN = its username.")
    ca_pem: str = Field(description="CA certificate: verifies the broker (--cafile).")
    serial: str = Field(description="Certificate serial (hex); revoked when the device goes.")


class DeviceCreated(DeviceInfo):
    password: str = Field(description="MQTT password; shown only once.")
    broker_url: str = Field(description="The host's MQTT broker, e.g. mqtt://127.0.0.1:1883.")
    topic_root: str = Field(description="The device's own topics: <topic_root>/#.")
    tls: DeviceTLS | None = Field(
        None, description="Client certificate when the host's broker has TLS."
    )


class RouteInfo(_Model):
    name: str
    host: str
    topic_filter: str
    destination: dict[str, Any] = Field(
        description="{kind: task|topic|shadow|controller, task?, reply_topic?, topic?, device?}"
    )
    source_device: str | None = None
    source_task: str | None = None
    where: dict[str, Any] | None = None


class TimerInfo(_Model):
    name: str
    host: str
    cron: str
    task: str
    event: dict[str, Any] = Field(default_factory=dict)
    missed: str = "skip"
    max_catchup: int = 10
    next_run: float | None = None


class ShadowInfo(_Model):
    device: str
    version: int
    state: dict[str, Any] = Field(description="{desired, reported, delta}")
    metadata: dict[str, Any] = Field(default_factory=dict)
    pending: bool = Field(False, description="Changed on the controller, not yet on the host.")


class DeviceMessageInfo(_Model):
    id: int
    host: str
    seq: int
    kind: str = Field(description="message (routed to the controller) or shadow (a sync).")
    body: dict[str, Any]
    spooled_at: float
    received_at: float


class DeploymentStep(_Model):
    name: str
    state: str = Field(description="running|done|failed")
    error: str | None = None


class DeploymentInfo(_Model):
    account: str
    host: str
    version: int
    state: str = Field(description="pending|applying|succeeded|failed|cancelled")
    steps: list[DeploymentStep] = Field(default_factory=list)
    failed_step: str | None = None
    error: str | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    updated_at: float


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


# --- call descriptions -------------------------------------------------------------------


def add_device(
    name: str, *, password: str | None = None, host: str | None = None,
    account: str | None = None, cert: bool | None = None,
) -> Call[DeviceCreated]:  # fmt: skip
    """``cert``: issue a client certificate (default: when the host's broker has TLS)."""
    body = _params(name=name, password=password, host=host, cert=cert)
    return Call("POST", "/v1/devices", _one(DeviceCreated), json=body,
                params=_params(account=account))  # fmt: skip


def list_devices(account: str | None = None) -> Call[list[DeviceInfo]]:
    return Call("GET", "/v1/devices", _many(DeviceInfo), params=_params(account=account))


def remove_device(name: str, account: str | None = None) -> Call[None]:
    return Call("DELETE", f"/v1/devices/{name}", _none, params=_params(account=account))


def issue_device_certificate(
    name: str, account: str | None = None, csr_pem: str | None = None
) -> Call[DeviceTLS]:
    """A new client certificate for a device; the one it had is revoked. With ``csr_pem``
    (PEM CSR made on the device) it is over the device's own key, and no key comes back."""
    return Call("POST", f"/v1/devices/{name}/certificate", _one(DeviceTLS),
                json=_params(csr_pem=csr_pem), params=_params(account=account))  # fmt: skip


def add_route(
    route: dict[str, Any], *, host: str | None = None, account: str | None = None
) -> Call[RouteInfo]:
    return Call("POST", "/v1/routes", _one(RouteInfo), json={**route, "host": host},
                params=_params(account=account))  # fmt: skip


def list_routes(account: str | None = None) -> Call[list[RouteInfo]]:
    return Call("GET", "/v1/routes", _many(RouteInfo), params=_params(account=account))


def remove_route(name: str, account: str | None = None) -> Call[None]:
    return Call("DELETE", f"/v1/routes/{name}", _none, params=_params(account=account))


def add_timer(
    timer: dict[str, Any], *, host: str | None = None, account: str | None = None
) -> Call[TimerInfo]:
    return Call("POST", "/v1/timers", _one(TimerInfo), json={**timer, "host": host},
                params=_params(account=account))  # fmt: skip


def list_timers(account: str | None = None) -> Call[list[TimerInfo]]:
    return Call("GET", "/v1/timers", _many(TimerInfo), params=_params(account=account))


def remove_timer(name: str, account: str | None = None) -> Call[None]:
    return Call("DELETE", f"/v1/timers/{name}", _none, params=_params(account=account))


def get_shadow(device: str, account: str | None = None) -> Call[ShadowInfo]:
    return Call("GET", f"/v1/shadows/{device}", _one(ShadowInfo), params=_params(account=account))


def update_shadow(
    device: str,
    *,
    desired: dict[str, Any] | None = None,
    reported: dict[str, Any] | None = None,
    version: int | None = None,
    account: str | None = None,
) -> Call[ShadowInfo]:
    body = {"state": _params(desired=desired, reported=reported), "version": version}
    return Call("POST", f"/v1/shadows/{device}", _one(ShadowInfo), json=body,
                params=_params(account=account))  # fmt: skip


def device_messages(
    after: int = 0, limit: int = 1000, account: str | None = None
) -> Call[list[DeviceMessageInfo]]:
    return Call("GET", "/v1/device-messages", _many(DeviceMessageInfo),
                params=_params(after=after, limit=limit, account=account))  # fmt: skip


def device_stats(host: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/hosts/{host}/devices/stats", _one(dict[str, Any]))


def apply_deployment(
    spec: dict[str, Any], account: str | None = None
) -> Call[list[DeploymentInfo]]:
    return Call("POST", "/v1/deployments", _many(DeploymentInfo), json=spec,
                params=_params(account=account))  # fmt: skip


def deployment_status(
    host: str | None = None, account: str | None = None, history: bool = False
) -> Call[list[DeploymentInfo]]:
    return Call("GET", "/v1/deployments", _many(DeploymentInfo),
                params=_params(host=host, account=account, history=history or None))  # fmt: skip


def cancel_deployment(
    host: str | None = None, account: str | None = None
) -> Call[list[DeploymentInfo]]:
    return Call("POST", "/v1/deployments/cancel", _many(DeploymentInfo),
                params=_params(host=host, account=account))  # fmt: skip


# --- deployment files --------------------------------------------------------------------


def load_deployment_file(path: Path) -> dict[str, Any]:
    """Read a deployment TOML file; task dirs (relative to the file) are packed inline.

    ::

        hosts = ["local"]                 # or host = "local"; empty: every host that is up
        [[tasks]]
        dir = "tasks/hello"               # a task bundle dir (or .tar.gz/.zip)
        name = "hello"                    # optional: the manifest's name otherwise
        overrides = { memory = "64M" }    # optional manifest overrides
        [[tasks]]
        name = "wordcount"                # no dir: the account's deployed task of that name
        # bundle = "<digest>"             # ... or exactly this stored bundle
        [[devices]]
        name = "sensor1"
        password = "..."                  # needed when the device is new
        [[routes]]
        name = "r1"
        topic_filter = "devices/acme.sensor1/readings"
        source_device = "sensor1"
        destination = { kind = "task", task = "hello", reply_topic = "devices/acme.sensor1/reply" }
        [[timers]]
        name = "t1"
        cron = "*/5 * * * *"
        task = "hello"
        [settings]                        # free-form, kept with the version
    """
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RequestError(f"{path}: cannot read the deployment file: {exc}") from exc
    tasks = []
    for i, t in enumerate(data.get("tasks", [])):
        if "dir" not in t:  # a task the controller already has (by name, or name + bundle)
            if "name" not in t:
                raise RequestError(f"{path}: tasks[{i}] needs 'dir' or 'name'")
            tasks.append({k: t[k] for k in ("name", "bundle", "overrides") if k in t})
            continue
        src = (path.parent / str(t["dir"])).resolve()
        archive = pack_bundle(src)
        tasks.append(
            {
                "name": t.get("name"),
                "archive_b64": base64.b64encode(archive).decode(),
                "overrides": dict(t.get("overrides", {})),
            }
        )
    hosts = list(data.get("hosts", []))
    if "host" in data:
        hosts.append(str(data["host"]))
    return {
        "hosts": hosts,
        "tasks": tasks,
        "devices": list(data.get("devices", [])),
        "routes": list(data.get("routes", [])),
        "timers": list(data.get("timers", [])),
        "settings": dict(data.get("settings", {})),
    }


# --- mixins ------------------------------------------------------------------------------


class DevicesMixin:
    """Devices, routes, timers, shadows and deployments for :class:`edgevisor.Client`."""

    if TYPE_CHECKING:

        def call(self, call: Call[T]) -> T: ...

    def add_device(self, name: str, **options: Any) -> DeviceCreated:
        """Register a device; the password in the answer is shown only this once."""
        return self.call(add_device(name, **options))

    def list_devices(self, account: str | None = None) -> list[DeviceInfo]:
        return self.call(list_devices(account))

    def remove_device(self, name: str, account: str | None = None) -> None:
        self.call(remove_device(name, account))

    def issue_device_certificate(
        self, name: str, account: str | None = None, csr_pem: str | None = None
    ) -> DeviceTLS:
        """A new TLS client certificate (key shown once, or over ``csr_pem``'s key); the
        previous one is revoked."""
        return self.call(issue_device_certificate(name, account, csr_pem))

    def add_route(self, route: dict[str, Any], **options: Any) -> RouteInfo:
        return self.call(add_route(route, **options))

    def list_routes(self, account: str | None = None) -> list[RouteInfo]:
        return self.call(list_routes(account))

    def remove_route(self, name: str, account: str | None = None) -> None:
        self.call(remove_route(name, account))

    def add_timer(self, timer: dict[str, Any], **options: Any) -> TimerInfo:
        return self.call(add_timer(timer, **options))

    def list_timers(self, account: str | None = None) -> list[TimerInfo]:
        return self.call(list_timers(account))

    def remove_timer(self, name: str, account: str | None = None) -> None:
        self.call(remove_timer(name, account))

    def get_shadow(self, device: str, account: str | None = None) -> ShadowInfo:
        return self.call(get_shadow(device, account))

    def update_shadow(self, device: str, **options: Any) -> ShadowInfo:
        """Patch ``desired``/``reported``; ``version`` makes it conditional (409 if stale)."""
        return self.call(update_shadow(device, **options))

    def device_messages(
        self, after: int = 0, limit: int = 1000, account: str | None = None
    ) -> list[DeviceMessageInfo]:
        return self.call(device_messages(after, limit, account))

    def device_stats(self, host: str) -> dict[str, Any]:
        """A host's device counters, spool depth and losses (admin token)."""
        return self.call(device_stats(host))

    def apply_deployment(
        self, spec: dict[str, Any] | Path, account: str | None = None
    ) -> list[DeploymentInfo]:
        """A new version per target host; ``spec`` as :func:`load_deployment_file` makes."""
        body = load_deployment_file(spec) if isinstance(spec, Path) else spec
        return self.call(apply_deployment(body, account))

    def deployment_status(
        self, host: str | None = None, account: str | None = None, history: bool = False
    ) -> list[DeploymentInfo]:
        return self.call(deployment_status(host, account, history))

    def cancel_deployment(
        self, host: str | None = None, account: str | None = None
    ) -> list[DeploymentInfo]:
        return self.call(cancel_deployment(host, account))


class AsyncDevicesMixin:
    """The same for :class:`edgevisor.AsyncClient`."""

    if TYPE_CHECKING:

        async def call(self, call: Call[T]) -> T: ...

    async def add_device(self, name: str, **options: Any) -> DeviceCreated:
        return await self.call(add_device(name, **options))

    async def list_devices(self, account: str | None = None) -> list[DeviceInfo]:
        return await self.call(list_devices(account))

    async def remove_device(self, name: str, account: str | None = None) -> None:
        await self.call(remove_device(name, account))

    async def issue_device_certificate(
        self, name: str, account: str | None = None, csr_pem: str | None = None
    ) -> DeviceTLS:
        return await self.call(issue_device_certificate(name, account, csr_pem))

    async def add_route(self, route: dict[str, Any], **options: Any) -> RouteInfo:
        return await self.call(add_route(route, **options))

    async def list_routes(self, account: str | None = None) -> list[RouteInfo]:
        return await self.call(list_routes(account))

    async def remove_route(self, name: str, account: str | None = None) -> None:
        await self.call(remove_route(name, account))

    async def add_timer(self, timer: dict[str, Any], **options: Any) -> TimerInfo:
        return await self.call(add_timer(timer, **options))

    async def list_timers(self, account: str | None = None) -> list[TimerInfo]:
        return await self.call(list_timers(account))

    async def remove_timer(self, name: str, account: str | None = None) -> None:
        await self.call(remove_timer(name, account))

    async def get_shadow(self, device: str, account: str | None = None) -> ShadowInfo:
        return await self.call(get_shadow(device, account))

    async def update_shadow(self, device: str, **options: Any) -> ShadowInfo:
        return await self.call(update_shadow(device, **options))

    async def device_messages(
        self, after: int = 0, limit: int = 1000, account: str | None = None
    ) -> list[DeviceMessageInfo]:
        return await self.call(device_messages(after, limit, account))

    async def device_stats(self, host: str) -> dict[str, Any]:
        return await self.call(device_stats(host))

    async def apply_deployment(
        self, spec: dict[str, Any] | Path, account: str | None = None
    ) -> list[DeploymentInfo]:
        body = load_deployment_file(spec) if isinstance(spec, Path) else spec
        return await self.call(apply_deployment(body, account))

    async def deployment_status(
        self, host: str | None = None, account: str | None = None, history: bool = False
    ) -> list[DeploymentInfo]:
        return await self.call(deployment_status(host, account, history))

    async def cancel_deployment(
        self, host: str | None = None, account: str | None = None
    ) -> list[DeploymentInfo]:
        return await self.call(cancel_deployment(host, account))
