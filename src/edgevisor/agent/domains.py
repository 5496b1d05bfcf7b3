"""Domains as an agent capability: the ``domains.*`` operations of one host.

Each domain lives in ``<agent dir>/domains/<account>.<name>/`` (``spec.json``, the
runtime's ``state.json``, its app files, its log and the volume's mount point). At start the
capability reads every spec, clears what a previous run of this agent left (see
:func:`edgevisor.migration.domain.clear_stale`), then starts again the domains that were
meant to run. Like tasks, domains of every account share the host and are named
``<account>.<name>``; the controller passes only the account it authenticated.

A domain created with a logical ``address`` (and the ``instance`` name its address record
is bound to) keeps both in ``network.json``: its namespace then holds that address, the
``addresses`` capability routes it (``plug``) and reports the instance while the domain
exists here, so the controller's leak collection leaves its record alone.

Operations run on the loop the capability started on: the controller may call in from
another loop (a test fixture), and a domain's tasks, locks and sandbox processes belong
to one loop and its thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Awaitable, Callable, Coroutine
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgevisor.errors import AlreadyExists, NotFound, PayloadTooLarge, RequestError
from edgevisor.migration.domain import Domain, LocalVolumes, VolumeBackend, clear_stale
from edgevisor.migration.domain_host import DomainError, StaleReport, remove_host_cgroups
from edgevisor.migration.domain_parts import (
    DomainSpec,
    DomainsSettings,
    command_of,
    slot_address,
    validate_name,
)
from edgevisor.settings import Settings
from edgevisor.tasks.cgroups import cgroups_available

if TYPE_CHECKING:
    from edgevisor.agent.addresses import AddressesCapability
    from edgevisor.agent.daemon import Agent

__all__ = ["DomainsCapability"]

log = logging.getLogger(__name__)
T = TypeVar("T")
SPEC_FILE = "spec.json"
NETWORK_FILE = "network.json"


def _unpack_app(archive: bytes, dest: Path, max_bytes: int) -> None:
    """Unpack a .tar.gz app archive safely (no links out, no devices, size-capped)."""
    if len(archive) > max_bytes:
        raise PayloadTooLarge(f"app archive is {len(archive)} bytes; the limit is {max_bytes}")
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tf:
            total = sum(m.size for m in tf.getmembers())
            if total > max_bytes:
                raise PayloadTooLarge(f"app unpacks to {total} bytes; the limit is {max_bytes}")
            tf.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise RequestError(f"app archive cannot be unpacked: {exc}") from exc
    for p in [dest, *dest.rglob("*")]:  # readable by the domain's unprivileged uid
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else (p.stat().st_mode | 0o444))


class DomainsCapability:
    """Runs this host's domains and answers ``domains.*``."""

    name = "domains"

    def __init__(self, settings: Settings, domains: DomainsSettings | None = None) -> None:
        self.settings = settings
        # the lead hangs the section into Settings as ``domains``; until then, defaults
        self.cfg: DomainsSettings = (
            domains or getattr(settings, "domains", None) or DomainsSettings()
        )
        self.domains: dict[str, Domain] = {}
        self.timings: dict[str, dict[str, dict[str, float]]] = {}
        """Per domain: sub-step seconds of its last start/quiesce/stage (kept after remove;
        benchmarks and the switch breakdown read it)."""
        self.volumes: VolumeBackend | None = None
        self.addresses: AddressesCapability | None = None
        self.networks: dict[str, dict[str, str]] = {}  # qualified -> address, instance
        self._host = ""
        self._key = ""
        self._dir = Path()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.missing = ""  # what this host lacks to run domains ("" when nothing)

    # -- capability ----------------------------------------------------------------------

    async def start(self, agent: Agent) -> None:
        self._loop = asyncio.get_running_loop()
        self._host = agent.host
        # kernel object names derive from this: unique per agent even when two agents of
        # the same host name share a machine (tests)
        self._key = f"{agent.host}\0{agent.dir.resolve()}"
        self._dir = agent.dir / "domains"
        self._dir.mkdir(parents=True, exist_ok=True)
        self.missing = _missing_isolation()
        if self.missing:
            log.warning("domains are unavailable on this host: %s", self.missing)
        try:
            self.volumes = agent.capability("volumes")
        except NotFound:  # until the volumes capability exists on every agent
            self.volumes = LocalVolumes(agent.dir / "domain-volumes")
        with contextlib.suppress(NotFound):
            addresses: AddressesCapability = agent.capability("addresses")
            if addresses.dp is not None:  # it started first: it knows whether it runs
                self.addresses = addresses
                addresses.add_instance_source(self.instance_names)
        for spec_path in sorted(self._dir.glob(f"*/{SPEC_FILE}")):
            try:
                spec = DomainSpec.model_validate_json(spec_path.read_text())
            except ValueError as exc:
                log.error("ignoring domain %s: bad spec: %s", spec_path.parent.name, exc)
                continue
            self._make(spec)
        report = (
            StaleReport([], [], [])
            if self.missing
            else await clear_stale(
                self._key,
                self.volumes,
                [d.spec.volume_id for d in self.domains.values()],
                timeout_s=self.cfg.stop_timeout_s,
            )
        )
        if report.netns or report.cgroups:
            log.info(
                "cleared %d namespaces and %d cgroups of domains left by a previous agent",
                len(report.netns), len(report.cgroups),
            )  # fmt: skip
        for d in list(self.domains.values()) if not self.missing else []:
            if d.desired == "running":
                try:
                    await d.start()
                except Exception:  # one broken domain must not keep the agent down
                    log.exception("domain %s did not start again", d.spec.qualified)
        ops: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]] = {
            "domains.create": self.op_create,
            "domains.start": self.op_start,
            "domains.stop": self.op_stop,
            "domains.freeze": self.op_freeze,
            "domains.thaw": self.op_thaw,
            "domains.quiesce": self.op_quiesce,
            "domains.remove": self.op_remove,
            "domains.info": self.op_info,
            "domains.list": self.op_list,
        }
        for op, fn in ops.items():
            agent.router.add(op, self._on_loop(fn))

    async def stop(self) -> None:
        for d in list(self.domains.values()):
            try:
                await d.stop(keep_desired=True)
            except Exception:
                log.exception("stopping domain %s failed", d.spec.qualified)
        if self._key:
            remove_host_cgroups(self._key)

    async def connected(self) -> None:
        return None

    def _on_loop(
        self, fn: Callable[[dict[str, Any]], Coroutine[Any, Any, T]]
    ) -> Callable[[dict[str, Any]], Awaitable[T]]:
        async def run(payload: dict[str, Any]) -> T:
            loop = self._loop
            if loop is None or loop is asyncio.get_running_loop():
                return await fn(payload)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(payload), loop))

        return run

    # -- the Python API (also for the migration runner) ---------------------------------

    def _make(self, spec: DomainSpec) -> Domain:
        used = {d._saved.slot for d in self.domains.values()}
        path = self._dir / spec.qualified
        saved = _saved_slot(path)
        slot = saved if saved is not None and saved not in used else _free_slot(used)
        assert self.volumes is not None
        net = _load_network(path)
        d = Domain(
            spec,
            host=self._key,
            dir=path,
            slot=slot,
            address=(
                IPv4Address(net["address"]) if net else slot_address(self.cfg.test_subnet, slot)
            ),
            volumes=self.volumes,
            settings=self.cfg,
            uid=self.settings.sandbox.uid,
            gid=self.settings.sandbox.gid,
            plug=self.addresses.plug if net and self.addresses is not None else None,
        )
        self.domains[spec.qualified] = d
        if net:
            self.networks[spec.qualified] = net
        return d

    def instance_names(self) -> list[str]:
        """The address-record instances of this host's domains (for leak collection)."""
        return [n["instance"] for q, n in self.networks.items() if q in self.domains]

    async def _report_instances(self) -> None:
        if self.addresses is not None:
            await self.addresses.report_instances()

    def get(self, account: str, name: str) -> Domain:
        d = self.domains.get(f"{account}.{name}")
        if d is None:
            raise NotFound(f"domain {name!r} not found on host {self._host!r}")
        return d

    def _require_isolation(self) -> None:
        if self.missing:
            raise DomainError(
                f"domains cannot run on host {self._host!r}: {self.missing} (domains need "
                "root, cgroup v1, bubblewrap, nsenter and ip)"
            )

    async def create(
        self, spec: DomainSpec, app: bytes | None = None, start: bool = True,
        *, address: str | None = None, instance: str | None = None,
    ) -> Domain:
        """Define (and start) a domain; with ``address``, its logical address (bound to
        the address record of ``instance``) instead of a test address."""
        self._require_isolation()
        net = _network(spec, address, instance)
        if spec.qualified in self.domains:
            raise AlreadyExists(f"domain {spec.name!r} already exists on host {self._host!r}")
        path = self._dir / spec.qualified
        if path.exists():  # a leftover of a failed create or remove
            await asyncio.to_thread(shutil.rmtree, path, True)
        path.mkdir(parents=True)
        try:
            (path / "app").mkdir()
            if app:
                await asyncio.to_thread(_unpack_app, app, path / "app", self.cfg.app_max_bytes)
            (path / SPEC_FILE).write_text(spec.model_dump_json())
            if net is not None:
                (path / NETWORK_FILE).write_text(json.dumps(net))
            d = self._make(spec)
            d._save()
        except BaseException:
            self.domains.pop(spec.qualified, None)
            self.networks.pop(spec.qualified, None)
            await asyncio.to_thread(shutil.rmtree, path, True)
            raise
        if net is not None:
            await self._report_instances()
        if start:
            await d.start()
        return d

    async def stage(self, account: str, name: str) -> None:
        """Build a stopped domain's network and cgroups ahead of its start (a migration's
        target, in prepare); see :meth:`Domain.stage`."""
        self._require_isolation()
        await self.get(account, name).stage()

    async def remove(self, account: str, name: str, *, keep_volume: bool = False) -> None:
        d = self.get(account, name)
        await d.stop()
        self.timings[d.spec.qualified] = dict(d.timings)
        assert self.volumes is not None
        if not keep_volume:
            with contextlib.suppress(NotFound):
                await self.volumes.remove(d.spec.volume_id)
        self.domains.pop(d.spec.qualified, None)
        await asyncio.to_thread(shutil.rmtree, d.dir, True)
        if self.networks.pop(d.spec.qualified, None) is not None:
            await self._report_instances()

    def info(self, d: Domain) -> dict[str, Any]:
        out = d.status()
        out.update(
            host=self._host,
            volume_size_bytes=d.spec.volume_size_bytes,
            memory_mb=d.spec.memory_mb,
            cpu=d.spec.cpu,
        )
        return out

    # -- operations ----------------------------------------------------------------------

    async def op_create(self, p: dict[str, Any]) -> dict[str, Any]:
        account = str(p["account"])
        name = validate_name("domain", str(p["name"]))
        cmd = p.get("command")
        if not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
            raise RequestError("command must be a list of strings")
        try:
            spec = DomainSpec(
                account=account,
                name=name,
                command=command_of(cmd),
                volume=str(p.get("volume") or f"domain-{name}"),
                volume_size_bytes=int(p["volume_size_bytes"]),
                restart=p.get("restart") or "on-failure",
                memory_mb=int(p.get("memory_mb") or self.cfg.memory_mb),
                cpu=float(p["cpu"]) if p.get("cpu") is not None else self.cfg.cpu,
                pids_max=int(p.get("pids_max") or self.cfg.pids_max),
                env=dict(p.get("env") or {}),
            )
        except ValueError as exc:
            raise RequestError(f"invalid domain: {exc}") from exc
        app = base64.b64decode(p["app_b64"]) if p.get("app_b64") else None
        d = await self.create(
            spec, app, start=bool(p.get("start", True)),
            address=p.get("address") or None, instance=p.get("instance") or None,
        )  # fmt: skip
        return self.info(d)

    def _of(self, p: dict[str, Any]) -> Domain:
        return self.get(str(p["account"]), str(p["name"]))

    async def op_start(self, p: dict[str, Any]) -> dict[str, Any]:
        d = self._of(p)
        self._require_isolation()
        await d.start()
        return self.info(d)

    async def op_stop(self, p: dict[str, Any]) -> dict[str, Any]:
        d = self._of(p)
        await d.stop()
        return self.info(d)

    async def op_freeze(self, p: dict[str, Any]) -> dict[str, Any]:
        d = self._of(p)
        await d.freeze()
        return self.info(d)

    async def op_thaw(self, p: dict[str, Any]) -> dict[str, Any]:
        d = self._of(p)
        await d.thaw()
        return self.info(d)

    async def op_quiesce(self, p: dict[str, Any]) -> dict[str, Any]:
        d = self._of(p)
        await d.quiesce()
        return self.info(d)

    async def op_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        await self.remove(str(p["account"]), str(p["name"]), keep_volume=bool(p.get("keep_volume")))
        return {"removed": p["name"]}

    async def op_info(self, p: dict[str, Any]) -> dict[str, Any]:
        return self.info(self._of(p))

    async def op_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        account = p.get("account")
        return [
            self.info(d)
            for key, d in sorted(self.domains.items())
            if account is None or d.spec.account == account
        ]


def _missing_isolation() -> str:
    if os.geteuid() != 0:
        return "the agent is not running as root"
    if not cgroups_available():
        return "cgroup v1 memory/pids/cpu/freezer are not writable"
    for tool in ("bwrap", "nsenter", "ip", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return ""


def _network(spec: DomainSpec, address: str | None, instance: str | None) -> dict[str, str] | None:
    if address is None:
        return None
    try:
        logical = IPv4Address(address)
    except ValueError as exc:
        raise RequestError(f"address must be an IPv4 address: {exc}") from exc
    return {"address": str(logical), "instance": instance or f"domain:{spec.qualified}"}


def _load_network(path: Path) -> dict[str, str] | None:
    try:
        raw = json.loads((path / NETWORK_FILE).read_text())
        return {"address": str(IPv4Address(raw["address"])), "instance": str(raw["instance"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("domain %s: ignoring a bad %s: %s", path.name, NETWORK_FILE, exc)
        return None


def _saved_slot(path: Path) -> int | None:
    try:
        return int(json.loads((path / "state.json").read_text())["slot"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _free_slot(used: set[int]) -> int:
    slot = 1
    while slot in used:
        slot += 1
    return slot
