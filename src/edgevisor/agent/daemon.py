"""The agent: joins the controller once, then heartbeats for as long as it runs.

Theory of operation: the first start presents a one-time join token and receives a
per-host credential, stored with mode 0600 under the agent's data dir. Every later start
(and every reconnect) uses that credential, so an agent that loses the controller keeps
running and comes back without a new join token. Only if the controller no longer knows
the credential (the host was removed) does the agent need a join token again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import uvicorn

from edgevisor.agent.capacity import capacity, route_source_address
from edgevisor.agent.rpc import OpRouter
from edgevisor.agent.server import create_agent_app
from edgevisor.errors import (
    ConfigError,
    EdgevisorError,
    NotFound,
    PeerUnavailable,
    Unauthorized,
    from_payload,
)
from edgevisor.httpserver import QuietServer, bound_port
from edgevisor.pki import HostIdentity
from edgevisor.settings import Settings

log = logging.getLogger(__name__)


class Capability(Protocol):
    """A capability the agent hosts (coordinator, devices, volumes, dataplane).

    ``start`` runs before the agent joins (so local work goes on without a controller)
    and registers the capability's operations on ``agent.router``; ``stop`` runs on the
    way out, in reverse order; ``connected`` runs each time the controller (re)appears.
    """

    name: str

    async def start(self, agent: Agent) -> None: ...

    async def stop(self) -> None: ...

    async def connected(self) -> None: ...


@dataclass(frozen=True)
class Credential:
    host: str
    controller_url: str
    secret: str  # presented by the agent to the controller
    agent_key: str = ""  # presented by the controller to the agent


class Agent:
    def __init__(self, settings: Settings, *, join_token: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.agent
        self.host = self.cfg.host_name
        self.dir = settings.data_dir / "agent" / self.host
        self.cred_path = self.dir / "credential.json"
        self.join_token = join_token or self.cfg.join_token
        self.state = "starting"  # starting | joined | connected | disconnected
        self.heartbeats = 0
        self.router = OpRouter()
        self.api_url: str | None = None  # set once the agent API listens
        self._agent_key = secrets.token_urlsafe(32)
        self.router.add("agent.info", self._op_info)
        self.capabilities: list[Capability] = []
        self._cred: Credential | None = None
        self._client = httpx.AsyncClient(
            base_url=self.cfg.controller_url, timeout=self.cfg.request_timeout_s
        )

    # -- credential --------------------------------------------------------------------

    def load_credential(self) -> Credential | None:
        try:
            raw = json.loads(self.cred_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if raw.get("host") != self.host:
            return None
        cred = Credential(
            raw["host"], raw.get("controller_url", ""), raw["secret"], raw.get("agent_key", "")
        )
        if cred.agent_key:
            self._agent_key = cred.agent_key
        return cred

    def _save_credential(self, cred: Credential) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cred_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(cred.__dict__, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.cred_path)

    # -- protocol ----------------------------------------------------------------------

    def _physical(self) -> str | None:
        return self.cfg.physical_address or route_source_address(self.cfg.controller_url)

    def _endpoint(self) -> dict[str, Any]:
        return {"agent_url": self.api_url, "agent_key": self._agent_key if self.api_url else None}

    def agent_key(self) -> str | None:
        return self._agent_key

    async def _op_info(self, _payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "host": self.host,
            "state": self.state,
            "heartbeats": self.heartbeats,
            "capacity": self._capacity(),
            "ops": self.router.names,
        }

    def _capacity(self) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        return capacity(self.dir)

    async def _post(self, path: str, body: dict[str, Any], secret: str | None = None) -> Any:
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        resp = await self._client.post(path, json=body, headers=headers)
        if resp.status_code >= 400:
            try:
                payload = resp.json()
            except ValueError:
                payload = resp.text
            raise from_payload(resp.status_code, payload)
        return resp.json()

    async def join(self) -> Credential:
        if not self.join_token:
            raise ConfigError(
                f"host {self.host!r} has no credential in {self.dir} and no join token: "
                "create one with `edgevisor host join-token` and pass --join-token"
            )
        body = {
            "name": self.host,
            "join_token": self.join_token,
            "capacity": self._capacity(),
            "physical_address": self._physical(),
            **self._endpoint(),
        }
        identity = HostIdentity(self.dir / "pki", self.host)
        body["csr_pem"] = identity.csr_pem()
        out = await self._post("/v1/hosts/join", body)
        if out.get("host_cert_pem") and out.get("ca_cert_pem"):
            identity.store(out["host_cert_pem"], out["ca_cert_pem"])
        cred = Credential(self.host, self.cfg.controller_url, out["credential"], self._agent_key)
        self._save_credential(cred)
        self.join_token = None  # spent
        log.info("host %s joined %s", self.host, self.cfg.controller_url)
        return cred

    async def heartbeat(self, cred: Credential) -> None:
        body = {
            "capacity": self._capacity(),
            "physical_address": self._physical(),
            **self._endpoint(),
        }
        await self._post(f"/v1/hosts/{self.host}/heartbeat", body, cred.secret)
        self.heartbeats += 1

    async def serve_api(self) -> asyncio.Task[None]:
        """Start the agent API; sets :attr:`api_url` to what the controller should call."""
        app = create_agent_app(self.router, self.agent_key)
        server = QuietServer(
            uvicorn.Config(
                app,
                host=self.cfg.listen_host,
                port=self.cfg.listen_port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                raise OSError(f"agent API could not listen on {self.cfg.listen_host}")
            await asyncio.sleep(0.02)
        port = bound_port(server)
        host = self.cfg.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = self._physical() or "127.0.0.1"
        self.api_url = self.cfg.advertise_url or f"http://{host}:{port}"
        self._api_server = server
        return task

    def add(self, capability: Capability) -> None:
        self.capabilities.append(capability)

    def capability(self, name: str) -> Any:
        """The capability called ``name`` (another capability's Python API)."""
        for cap in self.capabilities:
            if cap.name == name:
                return cap
        raise NotFound(f"this agent runs no {name!r} capability")

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Call the controller as this host (per-host credential); typed errors."""
        if self._cred is None:
            raise PeerUnavailable(f"host {self.host} has not joined the controller yet")
        headers = {"authorization": f"Bearer {self._cred.secret}"}
        try:
            resp = await self._client.request(method, path, json=body, headers=headers)
        except httpx.TransportError as exc:
            raise PeerUnavailable(f"controller unreachable: {exc}") from exc
        if resp.status_code >= 400:
            try:
                payload: Any = resp.json()
            except ValueError:
                payload = resp.text
            raise from_payload(resp.status_code, payload)
        return resp.json() if resp.content else None

    async def run(self, *, serve_api: bool = True) -> None:
        """Join if needed, then heartbeat forever; survives an unreachable controller."""
        started: list[Capability] = []
        api_task: asyncio.Task[None] | None = None
        try:
            for cap in self.capabilities:
                await cap.start(self)
                started.append(cap)
            api_task = await self.serve_api() if serve_api else None
            await self._loop()
        finally:
            for cap in reversed(started):
                try:
                    await cap.stop()
                except Exception:  # one failing stop must not leak the others
                    log.exception("stopping %s failed", cap.name)
            if api_task is not None:
                self._api_server.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(api_task, 5)

    async def _announce_connected(self) -> None:
        for cap in self.capabilities:
            try:
                await cap.connected()
            except Exception:  # a capability's resync failing must not stop heartbeats
                log.exception("%s: resync after connect failed", cap.name)

    async def _loop(self) -> None:
        cred = self.load_credential()
        backoff = self.cfg.heartbeat_interval_s
        try:
            while True:
                try:
                    if cred is None:
                        cred = await self.join()
                        self.state = "joined"
                    self._cred = cred
                    await self.heartbeat(cred)
                    if self.state != "connected":
                        log.info("host %s connected to the controller", self.host)
                        self.state = "connected"
                        await self._announce_connected()
                    self.state = "connected"
                    backoff = self.cfg.heartbeat_interval_s
                except Unauthorized as exc:
                    if cred is not None and self.join_token:
                        log.warning("credential refused (%s); joining again", exc.message)
                        cred = None
                        continue
                    log.error("controller refused host %s: %s", self.host, exc.message)
                    self.state = "disconnected"
                except (httpx.TransportError, EdgevisorError) as exc:
                    if isinstance(exc, ConfigError):
                        raise
                    if self.state != "disconnected":
                        log.warning(
                            "controller unreachable (%s); host %s keeps running and retries",
                            exc, self.host,
                        )
                    self.state = "disconnected"
                    backoff = min(backoff * 2, max(10.0, self.cfg.heartbeat_interval_s))
                    await asyncio.sleep(backoff)
                    continue
                await asyncio.sleep(self.cfg.heartbeat_interval_s)
        finally:
            await self._client.aclose()
