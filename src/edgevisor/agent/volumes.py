"""Volumes as an agent capability: local and lazy volumes, NBD exports, filesystem mounts.

One owner per volume: the agent process holds every volume open (a
:class:`~edgevisor.storage.volume.Volume`, or a
:class:`~edgevisor.storage.lazy.LazyVolume` over one while a post-copy fill runs) and
serves it three ways:

* **to other hosts** through one NBD server (TCP, TLS with the fleet host certificates,
  :mod:`edgevisor.pki`); an export names exactly one peer host, and the server lets only
  a client whose certificate CN is that host see or open it;
* **to this host's mounts** through a second NBD server on a unix socket (mode 0600,
  root only) under the agent's dir. :meth:`VolumesCapability.attach` starts the FUSE
  process (:mod:`edgevisor.storage.fuse_image`) with the device kind of
  :mod:`edgevisor.agent.volume_fuse`: the FUSE process is an NBD client of this process
  (and reads the data file directly once every block is present). Why not a ``lazy``
  kind that opens the volume inside the FUSE process: a lazy volume would then have two
  owners (the FUSE process filling it; the agent exporting, reporting progress and
  promoting it); with one owner, the FUSE process also rides out an agent restart;
* **to other capabilities** (domains, migration) through this Python API.

Every served device is a :class:`~.volume_parts.DeviceRef`, an indirection the agent can re-point
(:meth:`promote` swaps a finished lazy volume for its plain local volume) without closing
the NBD sessions or the mounts that use it.

Names: a volume belongs to an account; on the agent its id is ``<account>.<name>``
(account names have no dots). :meth:`create` and :meth:`create_lazy` take the plain name
and the account and return the info with ``id``; every other method takes the id.

Role: ``primary`` (the copy in use) or ``secondary`` (a copy that only follows: the
source of a migration after the switch). A secondary volume cannot be mounted here, so
its only writer is the peer that mirrors to it.

On disk, ``<volumes_dir>/<id>/`` holds ``meta.json`` (kind, role, source, mirror mode,
export peer) and ``vol/`` (the volume itself); the agent reopens everything on start and
resumes lazy fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgevisor.agent import volume_fuse
from edgevisor.agent.capacity import route_source_address
from edgevisor.agent.volume_parts import (
    DeviceRef,
    VolumeEntry,
    check_source,
    int_field,
    opt_str,
    socket_path,
    volume_id,
)
from edgevisor.errors import (
    AlreadyExists,
    Conflict,
    EdgevisorError,
    NotFound,
    PeerUnavailable,
    RequestError,
    UnavailableError,
)
from edgevisor.pki import HostIdentity
from edgevisor.settings import Settings
from edgevisor.storage.attach import AttachedVolume
from edgevisor.storage.blockdev import BlockDevice
from edgevisor.storage.config import StorageSettings
from edgevisor.storage.fuse_spare import SpareFuse
from edgevisor.storage.lazy import LazyVolume, RemoteSource
from edgevisor.storage.nbd_client import NBDClient
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

if TYPE_CHECKING:
    from edgevisor.agent.daemon import Agent

__all__ = ["VolumesCapability", "volume_id"]

log = logging.getLogger(__name__)

Role = Literal["primary", "secondary"]
Mirror = Literal["off", "async", "sync"]
_CHUNK = 4 << 20


class VolumesCapability:
    """The ``volumes`` capability (see the module docstring)."""

    name = "volumes"

    def __init__(self, settings: Settings, storage: StorageSettings | None = None) -> None:
        self.settings = settings
        self.cfg: StorageSettings = storage or settings.storage
        self._entries: dict[str, VolumeEntry] = {}
        self._agent: Agent | None = None
        self.identity: HostIdentity | None = None
        self.server: NBDServer | None = None
        self.local_server: NBDServer | None = None
        self.endpoint: tuple[str, int] | None = None
        self.local_socket: Path | None = None
        self.vol_dir = Path()
        self.attach_dir = Path()
        self._lock = asyncio.Lock()
        self.spares: SpareFuse | None = None  # a pre-started FUSE process for attaches

    # ------------------------------------------------------------------ lifecycle

    @property
    def agent(self) -> Agent:
        if self._agent is None:
            raise UnavailableError("the volumes capability has not started")
        return self._agent

    async def start(self, agent: Agent) -> None:
        self._agent = agent
        self.identity = HostIdentity(agent.dir / "pki", agent.host)
        self.vol_dir = Path(self.cfg.volumes_dir) if self.cfg.volumes_dir else agent.dir / "volumes"
        self.vol_dir.mkdir(parents=True, exist_ok=True)
        self.attach_dir = agent.dir / "attach"
        nbd = self.cfg.nbd
        self.server = NBDServer(
            ssl_context=self.identity.server_context() if self.identity.ready else None,
            tls_required=True,
            max_payload=nbd.max_payload_bytes,
            workers=nbd.worker_threads,
        )
        try:
            self.endpoint = await self.server.start(nbd.listen_host, nbd.listen_port)
        except OSError as exc:  # the host keeps its local volumes; exports are refused
            log.error("volumes: NBD endpoint cannot listen on %s:%s: %s",
                      nbd.listen_host, nbd.listen_port, exc)  # fmt: skip
            self.endpoint = None
        self.local_server = NBDServer(max_payload=nbd.max_payload_bytes)
        self.local_socket = socket_path(agent.dir)
        await self.local_server.start_unix(str(self.local_socket))
        for d in sorted(self.vol_dir.iterdir()):
            if (d / "meta.json").exists():
                try:
                    await self._reopen(d)
                except (EdgevisorError, OSError, ValueError, KeyError) as exc:
                    log.error("volumes: cannot reopen %s: %s", d.name, exc)
        if self.cfg.attach.fuse_spare:
            # started a little later, not in the agent's start-up
            self.spares = SpareFuse(settings=self.cfg.attach, preload=(volume_fuse.KIND,))
            self.spares.schedule_refill()
        self._register(agent)

    def _register(self, agent: Agent) -> None:
        r = agent.router
        r.add("volumes.create", self._op_create)
        r.add("volumes.create_lazy", self._op_create_lazy)
        r.add("volumes.list", self._op_list)
        r.add("volumes.info", self._op_info)
        r.add("volumes.remove", self._op_remove)
        r.add("volumes.export", self._op_export)
        r.add("volumes.unexport", self._op_unexport)

    async def stop(self) -> None:
        for srv in (self.server, self.local_server):
            if srv is not None:
                await srv.aclose()
        for e in list(self._entries.values()):
            await self._close(e)
        self._entries.clear()
        if self.spares is not None:
            self.spares.close()
            self.spares = None
        if self.local_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.local_socket.unlink()

    async def connected(self) -> None:
        """Make sure this host has its fleet certificate (hosts joined before PKI ask now)."""
        ident = self.identity
        if ident is None:
            return
        if not ident.ready:
            out = await self.agent.request(
                "POST", f"/v1/hosts/{self.agent.host}/certificate", {"csr_pem": ident.csr_pem()}
            )
            ident.store(out["host_cert_pem"], out["ca_cert_pem"])
            log.info("volumes: host certificate for %s stored", self.agent.host)
        self.enable_tls()

    def enable_tls(self) -> None:
        """Load the host certificate into the NBD endpoint (new sessions use it)."""
        if self.server is not None and self.identity is not None and self.identity.ready:
            self.server.ssl_context = self.identity.server_context()

    # ------------------------------------------------------------------ Python API

    async def create(
        self, name: str, size_bytes: int, *, account: str, block_size: int = 65536
    ) -> dict[str, Any]:
        """A new zero-filled local volume; returns its info."""
        vid = volume_id(account, name)
        self._check_size(size_bytes, block_size)
        async with self._lock:
            d = self._new_dir(vid)
            try:
                vol = await asyncio.to_thread(Volume.create, d / "vol", size_bytes, block_size)
            except BaseException:
                shutil.rmtree(d, ignore_errors=True)
                raise
            meta = {"account": account, "name": name, "kind": "plain", "role": "primary"}
            e = self._add(vid, d, vol, meta)
            e.save()
        return self.info(vid)

    async def create_lazy(
        self,
        name: str,
        size_bytes: int,
        *,
        account: str,
        source: dict[str, Any],
        mirror: Mirror = "sync",
        held: bool = False,
    ) -> dict[str, Any]:
        """A volume whose blocks come from ``source`` (``{"host", "address", "port",
        "export"}``, an export of another host designated for this one) on first read and
        by a background fill; writes are mirrored back per ``mirror``.

        ``held``: nothing is fetched (nor mirrored) until :meth:`release_lazy` says the
        source's data is final; a migration's target creates it so before the switch.
        The hold is persisted (a restarted agent keeps holding)."""
        vid = volume_id(account, name)
        src = check_source(source)
        block_size = int(source.get("block_size", self.cfg.default_block_size_bytes))
        self._check_size(size_bytes, block_size)
        if mirror not in ("off", "async", "sync"):
            raise RequestError(f"mirror must be off, async or sync, not {mirror!r}")
        probe = await self._connect(src)  # fail now, typed, rather than at the first read
        try:
            if probe.size_bytes != size_bytes:
                raise Conflict(
                    f"source export is {probe.size_bytes} bytes, not {size_bytes}",
                    details={"source_bytes": probe.size_bytes},
                )
        finally:
            await probe.aclose()
        async with self._lock:
            d = self._new_dir(vid)
            try:
                vol = await asyncio.to_thread(
                    Volume.create, d / "vol", size_bytes, block_size, present=False
                )
            except BaseException:
                shutil.rmtree(d, ignore_errors=True)
                raise
            meta: dict[str, Any] = {
                "account": account, "name": name, "kind": "lazy", "role": "primary",
                "source": src, "mirror": mirror,
            }  # fmt: skip
            if held:
                meta["held"] = True
            e = self._add(vid, d, vol, meta)
            e.save()
            self._start_lazy(e)
        return self.info(vid)

    def device(self, name: str) -> BlockDevice:
        """The volume's block device (stays valid across :meth:`promote`)."""
        return self._get(name).ref

    async def release_lazy(self, name: str) -> None:
        """End the hold of a lazy volume created ``held`` (idempotent)."""
        e = self._get(name)
        if e.meta.pop("held", None):
            e.save()
        if e.lazy is not None:
            e.lazy.release()

    async def prefetch(self, name: str, ranges: list[tuple[int, int]]) -> int:
        """Make ``ranges`` (byte offset, length) of a lazy volume present now, all asked
        at once (each contiguous run of missing blocks is one fetch); returns the bytes
        asked for. Best effort: a range that fails is left to the fill and to reads."""
        e = self._get(name)
        lazy = e.lazy
        if lazy is None or not ranges:
            return 0
        size = lazy.size_bytes
        todo = [(o, min(n, size - o)) for o, n in ranges if 0 <= o < size and n > 0]

        async def one(off: int, n: int) -> None:
            with contextlib.suppress(EdgevisorError, OSError):
                await lazy.read(off, n)

        await asyncio.gather(*(one(o, n) for o, n in todo))
        return sum(n for _o, n in todo)

    async def attach(
        self, name: str, target: Path, *, mount_ns: Path | None = None, mount: bool = True
    ) -> None:
        """Mount the volume as a filesystem at ``target`` (created on first use).

        ``mount=False`` brings up the FUSE process and loop device only (no byte read):
        staged ahead of a switch; a later ``attach`` adopts them and mounts."""
        e = self._get(name)
        if e.meta["role"] != "primary":
            raise Conflict(f"volume {name!r} is {e.meta['role']}: only a primary is mounted")
        async with e.busy:
            if e.attached is not None and e.attached.target != Path(os.path.abspath(target)):
                raise Conflict(f"volume {name!r} is already attached at {e.attached.target}")
            av = e.attached  # the same object: a staged one mounts without re-probing
            if av is None or av.mount_ns != mount_ns:
                av = AttachedVolume(
                    e.id, state_dir=self.attach_dir, target=target, kind=volume_fuse.KIND,
                    arg=self._fuse_arg(e), settings=self.cfg.attach, mount_ns=mount_ns,
                    spares=self.spares)  # fmt: skip
            await av.attach(mount=mount)
            e.attached = av
            e.meta["attached"] = {"target": str(av.target), "mount_ns": opt_str(mount_ns)}
            e.save()

    async def detach(self, name: str) -> None:
        e = self._get(name)
        async with e.busy:
            av = e.attached or self._attachment_from_meta(e)
            if av is not None:
                await av.detach()
            e.attached = None
            e.meta.pop("attached", None)
            e.save()

    async def export(self, name: str, *, peer: str) -> dict[str, Any]:
        """Offer the volume over NBD/TLS to host ``peer`` only; returns its endpoint."""
        e = self._get(name)
        if self.server is None or self.endpoint is None:
            raise UnavailableError("this host's NBD endpoint is not listening")
        if self.server.ssl_context is None:
            raise UnavailableError(
                "this host has no fleet certificate yet (it gets one from the controller)"
            )
        if not peer:
            raise RequestError("export needs a peer host")
        old = self.server.exports.get(e.id)
        if old is not None and old.allowed_peers != frozenset({peer}):
            self.server.remove_export(e.id)  # re-designating closes the old peer's sessions
            old = None
        if old is None:
            self.server.add_export(
                Export(e.id, e.ref, allowed_peers=frozenset({peer}), description=e.name)
            )
        e.meta["exported_to"] = peer
        e.save()
        return self._endpoint_of(e.id)

    async def unexport(self, name: str) -> None:
        e = self._get(name)
        if self.server is not None:
            self.server.remove_export(e.id)
        e.meta.pop("exported_to", None)
        e.save()

    async def remove(self, name: str) -> None:
        """Delete the volume and its data; refused while it is mounted."""
        e = self._get(name)
        async with e.busy:
            if e.attached is not None or "attached" in e.meta:
                raise Conflict(f"volume {name!r} is attached; detach it first")
            async with self._lock:
                self._entries.pop(e.id, None)
                await self._close(e)
                await asyncio.to_thread(shutil.rmtree, e.dir, True)

    def info(self, name: str) -> dict[str, Any]:
        e = self._get(name)
        v = e.volume
        lazy: dict[str, Any] | None = None
        if e.lazy is not None:
            p = e.lazy.progress()
            lazy = {
                "bytes_present": p.bytes_present, "bytes_total": p.bytes_total,
                "rate_bytes_per_s": p.rate_bytes_per_s, "eta_s": p.eta_s, "done": p.done,
                "source": e.meta.get("source"), "mirror": e.meta.get("mirror"),
            }  # fmt: skip
        attached = e.meta.get("attached")
        return {
            "id": e.id,
            "name": e.name,
            "account": e.account,
            "host": self.agent.host,
            "kind": e.meta["kind"],
            "role": e.meta["role"],
            "size_bytes": v.size_bytes,
            "block_size": v.block_size,
            "present_bytes": min(v.present_blocks * v.block_size, v.size_bytes),
            "lazy": lazy,
            "attached": attached["target"] if attached else None,
            "exported_to": e.meta.get("exported_to"),
            "corrupt": v.corrupt_reason,
        }

    def list_volumes(self, account: str | None = None) -> list[dict[str, Any]]:
        return [
            self.info(vid)
            for vid, e in sorted(self._entries.items())
            if account is None or e.account == account
        ]

    async def checksum(self, name: str) -> str:
        """sha256 of the volume's content (a lazy volume fetches what it lacks)."""
        e = self._get(name)
        if e.lazy is None:
            return await e.volume.checksum()
        h = hashlib.sha256()
        dev = e.ref
        for off in range(0, dev.size_bytes, _CHUNK):
            h.update(await dev.read(off, min(_CHUNK, dev.size_bytes - off)))
        return h.hexdigest()

    async def set_role(self, name: str, role: Role) -> None:
        e = self._get(name)
        if role not in ("primary", "secondary"):
            raise RequestError(f"role must be primary or secondary, not {role!r}")
        if role == "secondary" and (e.attached is not None or "attached" in e.meta):
            raise Conflict(f"volume {name!r} is mounted here; detach before demoting it")
        e.meta["role"] = role
        e.save()

    async def promote(self, name: str) -> None:
        """A lazy volume whose fill ended becomes a plain local volume (source released)."""
        e = self._get(name)
        if e.lazy is None:
            return
        lazy = e.lazy
        if not lazy.filled.is_set():
            p = lazy.progress()
            raise Conflict(
                f"volume {name!r} is still filling ({p.bytes_present}/{p.bytes_total} bytes)",
                details={"bytes_present": p.bytes_present, "bytes_total": p.bytes_total},
            )
        if e.meta.get("mirror") == "async":
            await lazy.drain_mirror()
        e.ref.target = e.volume  # new requests go to the local volume from here on
        e.lazy = None
        await lazy.aclose()
        e.meta["kind"] = "plain"
        e.meta.pop("source", None)
        e.meta.pop("mirror", None)
        e.save()

    async def wait_filled(self, name: str, timeout_s: float | None = None) -> None:
        """Wait until a lazy volume's fill ended (returns at once for a plain volume)."""
        e = self._get(name)
        if e.lazy is not None:
            await asyncio.wait_for(e.lazy.filled.wait(), timeout_s)

    def set_fill_rate(self, name: str, bytes_per_s: int) -> None:
        e = self._get(name)
        if e.lazy is not None:
            e.lazy.set_fill_rate(bytes_per_s)

    # ------------------------------------------------------------------ operations

    @staticmethod
    def _id_of(p: dict[str, Any]) -> str:
        return volume_id(str(p.get("account", "")), str(p.get("name", "")))

    async def _op_create(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.create(
            str(p.get("name", "")), int_field(p, "size_bytes"), account=str(p.get("account", "")),
            block_size=int(p.get("block_size") or self.cfg.default_block_size_bytes),
        )  # fmt: skip

    async def _op_create_lazy(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.create_lazy(
            str(p.get("name", "")), int_field(p, "size_bytes"), account=str(p.get("account", "")),
            source=dict(p.get("source") or {}), mirror=p.get("mirror", "sync"),
        )  # fmt: skip

    async def _op_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        account = p.get("account")
        return self.list_volumes(str(account) if account else None)

    async def _op_info(self, p: dict[str, Any]) -> dict[str, Any]:
        return self.info(self._id_of(p))

    async def _op_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        vid = self._id_of(p)
        if vid not in self._entries and p.get("missing_ok"):
            return {"removed": False}
        await self.remove(vid)
        return {"removed": True}

    async def _op_export(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.export(self._id_of(p), peer=str(p.get("peer", "")))

    async def _op_unexport(self, p: dict[str, Any]) -> dict[str, Any]:
        await self.unexport(self._id_of(p))
        return {"unexported": True}

    # ------------------------------------------------------------------ internals

    def _get(self, vid: str) -> VolumeEntry:
        e = self._entries.get(vid)
        if e is None:
            raise NotFound(f"volume {vid!r} not found on host {self.agent.host}")
        return e

    def _check_size(self, size_bytes: int, block_size: int) -> None:
        if size_bytes <= 0:
            raise RequestError(f"volume size must be positive, got {size_bytes}")
        if size_bytes > self.cfg.max_volume_bytes:
            raise RequestError(
                f"volume size {size_bytes} exceeds this host's limit {self.cfg.max_volume_bytes}"
            )
        if block_size < 4096 or block_size > 1 << 22 or block_size & (block_size - 1):
            raise RequestError(f"block size must be a power of two in [4K, 4M]: {block_size}")
        if size_bytes % 512:
            raise RequestError(f"volume size must be a multiple of 512 bytes: {size_bytes}")

    def _new_dir(self, vid: str) -> Path:
        if vid in self._entries:
            raise AlreadyExists(f"volume {vid!r} already exists on host {self.agent.host}")
        d = self.vol_dir / vid
        if d.exists():  # left by a create that crashed before meta.json
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def _add(self, vid: str, d: Path, vol: Volume, meta: dict[str, Any]) -> VolumeEntry:
        e = VolumeEntry(vid, meta["account"], meta["name"], d, vol, DeviceRef(vol), meta)
        self._entries[vid] = e
        assert self.local_server is not None
        self.local_server.add_export(Export(vid, e.ref, description=e.name))
        return e

    async def _reopen(self, d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        vid = volume_id(meta["account"], meta["name"])
        vol = await asyncio.to_thread(Volume.open, d / "vol")
        e = self._add(vid, d, vol, meta)
        if meta["kind"] == "lazy":
            self._start_lazy(e)
        if meta.get("exported_to") and self.server is not None:
            self.server.add_export(
                Export(vid, e.ref, allowed_peers=frozenset({meta["exported_to"]}))
            )
        e.attached = self._attachment_from_meta(e)

    def _attachment_from_meta(self, e: VolumeEntry) -> AttachedVolume | None:
        att = e.meta.get("attached")
        if not att:
            return None
        ns = att.get("mount_ns")
        return AttachedVolume(
            e.id, state_dir=self.attach_dir, target=Path(att["target"]), kind=volume_fuse.KIND,
            arg=self._fuse_arg(e), settings=self.cfg.attach, mount_ns=Path(ns) if ns else None,
            spares=self.spares,
        )  # fmt: skip

    def _fuse_arg(self, e: VolumeEntry) -> str:
        assert self.local_socket is not None
        return volume_fuse.device_arg(str(self.local_socket), e.id, str(e.volume.data_path))

    def _start_lazy(self, e: VolumeEntry) -> None:
        src = e.meta["source"]
        lazy_cfg = self.cfg.lazy.model_copy(update={"mirror": e.meta.get("mirror", "sync")})

        async def connect() -> RemoteSource:
            return await self._connect(src)

        e.lazy = LazyVolume(e.volume, connect, lazy_cfg, held=bool(e.meta.get("held")))
        e.ref.target = e.lazy
        e.lazy.start()

    async def _connect(self, src: dict[str, Any]) -> NBDClient:
        ident = self.identity
        if ident is None or not ident.ready:
            raise PeerUnavailable("this host has no fleet certificate yet; cannot reach peers")
        return await NBDClient.connect(
            src["address"], int(src["port"]), src["export"],
            ssl_context=ident.client_context(), server_hostname=src["host"],
        )  # fmt: skip

    async def _close(self, e: VolumeEntry) -> None:
        for srv in (self.server, self.local_server):
            if srv is not None and e.id in srv.exports:
                srv.remove_export(e.id)
        if e.lazy is not None:
            with contextlib.suppress(Exception):
                await e.lazy.aclose()
        await e.volume.aclose()

    def _endpoint_of(self, vid: str) -> dict[str, Any]:
        assert self.endpoint is not None
        host, port = self.endpoint
        address = self.cfg.nbd_advertise_address or host
        if address in ("0.0.0.0", "::", ""):
            address = route_source_address(self.agent.cfg.controller_url) or "127.0.0.1"
        return {"host": self.agent.host, "address": address, "port": port, "export": vid}
