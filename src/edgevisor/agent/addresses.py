"""The address dataplane as an agent capability: records in, nftables tables out.

Theory of operation
-------------------
As root, ``start`` prepares the host's kernel settings and opens a
:class:`~edgevisor.network.dataplane.Dataplane` on the fabric interface (configured, or
the one routing to the controller). Each time the controller (re)appears
(``connected``), the agent fetches ``GET /v1/hosts/{name}/records`` and rebuilds its whole
table from it in one transaction: after a restart the table comes from records, never
from memory or from what an earlier process left in the kernel. It then reports the
generation it applied per record.

Operations (called by the controller):

- ``records.apply`` ``{"full": bool, "records": [...], "removed": [...]}``: a delta (the
  default) or the whole set. Bound records translate; any other state, and everything
  in ``removed``, drops its mapping. The answer lists, per record, the generation
  applied or the error; a refused transaction keeps the last good table (the
  controller's reconciler retries). The answer comes once the translation is committed:
  new connections use it, and flows opened to the old mapping are dropped from that
  moment (the dataplane's ``stale`` fence is in the same nftables transaction). The
  link-level work (addresses, routes, gratuitous ARPs) follows right after, before the
  next update (also a teardown: a physical address this host gave up may be handed to
  another host by the next move, and must not be held here meanwhile). The conntrack
  cleanup of the fenced flows (kernel-filtered deletes, ~0.5 ms on a light table; a
  ~10 ms dump of the kernel's whole hash table where the filter is refused or dearer,
  see :mod:`edgevisor.network.conntrack`) runs after that, off the lock, so it delays
  no later update, and :data:`FLUSH_WINDOW_S` after the answer, so it takes no CPU from
  the rest of the change's path; the updates of that window share one cleanup.
- ``records.prepare`` ``{"token": str, "records": [...], "removed": [...]}`` and
  ``records.commit`` ``{"token": str}``: ``records.apply`` in two steps for a fenced
  move (see :mod:`.records_staging`). The prepare validates and stages the delta and
  touches nothing in the kernel; it also plans and encodes the delta's nftables batch
  ahead (:meth:`~edgevisor.network.dataplane.Dataplane.prepare`), so that the commit,
  on the critical path of the move, only sends it. The commit applies what was staged
  and answers as ``records.apply`` does (a commit with no staged prepare is refused with
  :class:`~edgevisor.agent.channel_frames.NotPrepared`). Generations are checked at the
  commit: an update that overtook the prepare wins (and a batch planned before a change
  of the table is planned again).
- ``records.state``: what this host translates now (per record id: generation).
- ``instances.create`` / ``instances.remove``: an instance is a network namespace behind
  a veth holding its logical address (until domains exist). The instances are noted in
  the agent's data dir and reported to the controller for leak collection.

Domains with a logical address are instances too, built by the domains capability: it
registers them with :meth:`AddressesCapability.add_instance_source` (reported with the
host's own while the domain exists on this host, running or not) and calls
:meth:`AddressesCapability.plug` once a domain's veth is up (its route in the account's
table: a veth that appears after its record was applied has none yet).

Without root (or with ``network.dataplane_mode = "off"``, or in ``auto`` mode when the
controller is on loopback, i.e. a single machine) the capability logs that address
translation is unavailable and every operation answers that clearly; the host's own
namespace is then left untouched (no sysctls, no nftables table).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevisor.agent.channel_frames import NotPrepared
from edgevisor.agent.records_staging import Staging
from edgevisor.errors import EdgevisorError, RequestError, UnavailableError
from edgevisor.network.config import AUTO_FABRIC, NetworkSettings
from edgevisor.settings import Settings

if TYPE_CHECKING:
    from edgevisor.agent.daemon import Agent
    from edgevisor.network.dataplane import AppliedRecord, Dataplane, Pending, Prepared

#: A staged delta: its (record, removed) pairs, and its batch planned ahead (or None).
_Staged = tuple[list[tuple["WireRecord", bool]], "Prepared | None"]

log = logging.getLogger(__name__)

__all__ = ["AddressesCapability", "DataplaneUnavailable", "WireRecord", "fabric_interface"]

#: Deltas of at most this many records are committed on the event loop, not in a thread.
INLINE_COMMIT_MAX = 16
#: Conntrack cleanups of the updates within this long after the first go together.
FLUSH_WINDOW_S = 0.1


class DataplaneUnavailable(UnavailableError):
    """This host does not run the address-translation dataplane."""

    code = "dataplane_unavailable"


@dataclass(frozen=True)
class WireRecord:
    """A record as the controller sends it (the fields the dataplane needs)."""

    id: int
    account: str
    logical: str
    physical: str | None
    host: str | None
    state: str
    generation: int

    @classmethod
    def parse(cls, raw: Any) -> WireRecord:
        if not isinstance(raw, dict):
            raise RequestError("a record must be a JSON object")
        try:
            return cls(id=int(raw["id"]), account=str(raw["account"]),
                       logical=str(raw["logical"]), physical=raw.get("physical"),
                       host=raw.get("host"), state=str(raw["state"]),
                       generation=int(raw["generation"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError(f"malformed record {raw!r}: {exc}") from exc

    def applied(self, removed: bool = False) -> AppliedRecord:
        """The dataplane's view; anything not bound (or removed) drops its mapping."""
        from edgevisor.network.dataplane import AppliedRecord

        active = self.state == "bound" and not removed and self.physical and self.host
        logical = ip_address(self.logical)
        unspecified = "0.0.0.0" if logical.version == 4 else "::"
        return AppliedRecord(
            account=self.account, logical=logical,
            physical=ip_address(self.physical if active and self.physical else unspecified),
            host=self.host if active and self.host else "",
            generation=self.generation, state="active" if active else "released",
        )


def fabric_interface(controller_url: str) -> str | None:
    """The interface of the route towards the controller (no packet is sent)."""
    from urllib.parse import urlsplit

    from pyroute2 import IPRoute

    host = urlsplit(controller_url).hostname or "127.0.0.1"
    try:
        dst = str(ip_address(host))
    except ValueError:
        import socket

        dst = socket.gethostbyname(host)
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=dst)
        if not routes:
            return None
        oif = routes[0].get_attr("RTA_OIF")
        links = ipr.get_links(oif)
        return str(links[0].get_attr("IFLA_IFNAME")) if links else None


class AddressesCapability:
    """Owns the host's :class:`Dataplane` and answers ``records.*`` and ``instances.*``."""

    name = "addresses"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg: NetworkSettings = settings.network
        self.dp: Dataplane | None = None
        self.unavailable: str | None = None
        self.applied: dict[int, int] = {}  # record id -> generation this host applied
        self.keys: dict[int, tuple[str, str]] = {}  # record id -> (account, logical)
        # Newest generation seen per record: pushes may overtake each other, and an older
        # one must not undo a newer one (generations only grow).
        self.seen: dict[int, int] = {}
        self.instances: dict[str, dict[str, str]] = {}
        self._agent: Agent | None = None
        self._lock = asyncio.Lock()
        self._finishers: set[asyncio.Task[None]] = set()  # running, and holding references
        # Committed updates whose conntrack cleanup is still to do, and its task.
        self._unflushed: list[Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._path: Path | None = None
        self._sources: list[Callable[[], Iterable[str]]] = []
        # records.prepare'd deltas by token, until their records.commit.
        self._staged: Staging[_Staged] = Staging()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, agent: Agent) -> None:
        self._agent = agent
        self._path = agent.dir / "instances.json"
        for op, fn in {
            "records.apply": self.op_apply,
            "records.state": self.op_state,
            "records.prepare": self.op_prepare,
            "records.commit": self.op_commit,
            "instances.create": self.op_create,
            "instances.remove": self.op_remove,
            "instances.list": self.op_list,
        }.items():
            agent.router.add(op, fn)
        if not self.cfg.dataplane_enabled():
            why = ("not running as root" if os.geteuid() != 0
                   else "network.dataplane_mode is off")
            self.unavailable = (f"address translation is unavailable on host {agent.host}: "
                                f"{why}")
            log.warning("%s; address records are not applied here", self.unavailable)
            return
        try:
            await asyncio.to_thread(self._open, agent)
        except (EdgevisorError, OSError) as exc:
            msg = exc.message if isinstance(exc, EdgevisorError) else str(exc)
            self.unavailable = f"address translation is unavailable on host {agent.host}: {msg}"
            expected = isinstance(exc, DataplaneUnavailable)  # a setting, not a fault
            log.log(logging.WARNING if expected else logging.ERROR, "%s", self.unavailable)
            return
        self._load_instances()

    def _open(self, agent: Agent) -> None:
        from edgevisor.network.dataplane import Dataplane
        from edgevisor.network.netns import prepare_host

        dps = self.cfg.dataplane
        if dps.fabric_if == AUTO_FABRIC:
            fab = fabric_interface(agent.cfg.controller_url)
            if fab is None:
                raise DataplaneUnavailable("no route towards the controller to pick the "
                                           "fabric interface; set network.dataplane.fabric_if")
            if fab == "lo" and self.cfg.dataplane_mode == "auto":
                # A controller on loopback is a single machine (`edgevisor up`): there is
                # no fabric to translate on, and the host's own namespace is left alone
                # (no forwarding, no table) unless network.dataplane_mode is "on".
                raise DataplaneUnavailable(
                    "the controller is on loopback (single machine); set "
                    "network.dataplane_mode = \"on\" and network.dataplane.fabric_if to use it"
                )
            dps = dps.model_copy(update={"fabric_if": fab})
        prepare_host()
        self.dp = Dataplane(agent.host, dps)
        log.info("address dataplane on %s (fabric %s)", agent.host, dps.fabric_if)

    async def stop(self) -> None:
        # The kernel table stays: instances keep talking while the agent restarts; the
        # next start rebuilds it from the controller's records.
        while self._finishers:  # a finisher may start the conntrack cleanup's task
            await asyncio.gather(*list(self._finishers), return_exceptions=True)
        if self.dp is not None:
            # In a thread: pyroute2's close runs its own event loop, which cannot run
            # inside this one ("Cannot run the event loop while another loop is running").
            await asyncio.to_thread(self.dp.close)
            self.dp = None

    async def connected(self) -> None:
        if self.dp is None or self._agent is None:
            return
        await self.resync()

    async def resync(self) -> dict[str, Any]:
        """Rebuild the table from the controller's records and report what was applied."""
        assert self._agent is not None
        body = await self._agent.request("GET", f"/v1/hosts/{self._agent.host}/records")
        result = await self._apply(body.get("records", []), body.get("removed", []),
                                   full=True, rebuild=True)
        await self._agent.request(
            "POST", f"/v1/hosts/{self._agent.host}/records/applied",
            {"reports": result["reports"], "instances": self.instance_names()},
        )
        return result

    # -- records -------------------------------------------------------------------------

    def _need(self) -> Dataplane:
        if self.dp is None:
            raise DataplaneUnavailable(self.unavailable or "the dataplane is not running")
        return self.dp

    async def op_apply(self, payload: dict[str, Any]) -> dict[str, Any]:
        # handled_s / handled_cpu_s: wall and CPU time (this thread) of the operation, so
        # that a caller on a loaded machine can tell waiting from working.
        t0, c0 = time.perf_counter(), time.thread_time()
        self._need()
        recs = payload.get("records", [])
        removed = payload.get("removed", [])
        if not isinstance(recs, list) or not isinstance(removed, list):
            raise RequestError("records and removed must be lists")
        out = await self._apply(recs, removed, full=bool(payload.get("full")))
        return self._timed(out, t0, c0)

    @staticmethod
    def _timed(out: dict[str, Any], t0: float, c0: float) -> dict[str, Any]:
        # started_s: when the op started, on the host's monotonic clock (perf_counter),
        # so that a caller on the same machine (a benchmark) can split a round trip.
        out["started_s"] = t0
        out["handled_s"] = time.perf_counter() - t0
        out["handled_cpu_s"] = time.thread_time() - c0
        return out

    @staticmethod
    def _parse(raw: list[Any], raw_removed: list[Any]) -> list[tuple[WireRecord, bool]]:
        """``(record, removed)`` pairs, removals first (see :meth:`_apply`)."""
        given = [WireRecord.parse(r) for r in raw]
        gone = [WireRecord.parse(r) for r in raw_removed]
        return [(g, True) for g in gone] + [(r, False) for r in given]

    async def op_prepare(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Stage a delta for :meth:`op_commit`; nothing reaches the kernel here."""
        self._need()
        token = self._field(payload, "token")
        if payload.get("full"):
            raise RequestError("records.prepare takes a delta (full sets: records.apply)")
        recs = payload.get("records", [])
        removed = payload.get("removed", [])
        if not isinstance(recs, list) or not isinstance(removed, list):
            raise RequestError("records and removed must be lists")
        staged = self._parse(recs, removed)
        prepared: Prepared | None = None
        dp = self.dp
        # Planned ahead only while no update is under way (a commit or its link work may
        # be changing the dataplane's state in a thread); the commit checks that nothing
        # changed since, else plans again.
        if dp is not None and not self._lock.locked():
            by_key, _usable, errors = self._usable(staged)
            if not errors:
                try:
                    prepared = dp.prepare(by_key.values())
                except Exception:  # the commit plans it then, and reports what fails
                    log.exception("planning a prepared records update ahead failed")
        self._staged.put(token, (staged, prepared), time.monotonic())
        return {"prepared": token, "records": len(staged)}

    async def op_commit(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Apply the delta staged under ``token``; answers as ``records.apply``."""
        t0, c0 = time.perf_counter(), time.thread_time()
        self._need()
        token = self._field(payload, "token")
        staged = self._staged.take(token, time.monotonic())
        if staged is None:
            raise NotPrepared(f"no prepared update {token!r} (expired or never made)")
        parsed, prepared = staged
        out = await self._apply([], [], full=False, parsed=parsed, prepared=prepared)
        return self._timed(out, t0, c0)

    def _usable(
        self, parsed: list[tuple[WireRecord, bool]]
    ) -> tuple[dict[tuple[str, IPv4Address | IPv6Address], AppliedRecord],
               list[tuple[WireRecord, bool]], list[dict[str, Any]]]:
        """The dataplane's records of a delta (by key; removals first, so that a live
        record with the same key wins), the pairs they come from, and the reports of
        records that cannot be translated here. Records overtaken by a newer push of
        the same record are left out."""
        reports: list[dict[str, Any]] = []
        usable: list[tuple[WireRecord, bool]] = []
        by_key: dict[tuple[str, IPv4Address | IPv6Address], AppliedRecord] = {}
        for rec, is_removed in parsed:
            if rec.generation < self.seen.get(rec.id, 0):
                continue  # overtaken by a newer push of this record
            try:
                ar = rec.applied(removed=is_removed)
            except ValueError as exc:  # a bad address, or logical/physical of two families
                reports.append({"record_id": rec.id, "generation": rec.generation,
                                "error": f"record cannot be translated here: {exc}"})
                continue
            usable.append((rec, is_removed))
            by_key[ar.key] = ar
        return by_key, usable, reports

    async def _apply(
        self, raw: list[Any], raw_removed: list[Any], *, full: bool, rebuild: bool = False,
        parsed: list[tuple[WireRecord, bool]] | None = None,
        prepared: Prepared | None = None,
    ) -> dict[str, Any]:
        from edgevisor.network.dataplane import ApplyFailed

        dp = self._need()
        by_key, usable, reports = self._usable(
            parsed if parsed is not None else self._parse(raw, raw_removed))
        await self._lock.acquire()
        finishing = False
        try:
            try:
                if rebuild:
                    res = await asyncio.to_thread(dp.rebuild, by_key.values())
                    extra = {"element_ops": res.element_ops, "committed_s": res.committed_s,
                             "warnings": list(res.warnings)}
                else:
                    if full or len(by_key) > INLINE_COMMIT_MAX:
                        pending = await asyncio.to_thread(dp.commit, by_key.values(),
                                                          full=full)
                    else:
                        # A small delta commits in well under a millisecond: inline, as a
                        # thread hop costs more than that on a busy host.
                        pending = dp.commit(by_key.values(), full=False, prepared=prepared)
                    extra = {"element_ops": pending.batch.element_ops,
                             "committed_s": pending.committed_s, "warnings": []}
                    # Answer once the translation (and the fence of old flows) is in the
                    # kernel; addresses, routes and gratuitous ARPs follow at once, still
                    # under the lock, so the next update starts after them; the conntrack
                    # cleanup after that, off the lock (see _finish).
                    task = asyncio.create_task(self._finish(dp, pending))
                    self._finishers.add(task)
                    task.add_done_callback(self._finishers.discard)
                    finishing = True
            except ApplyFailed as exc:
                log.warning("records not applied (last good table kept): %s", exc.message)
                for rec, _ in usable:
                    reports.append({"record_id": rec.id, "generation": rec.generation,
                                    "error": exc.message})
                return {"reports": reports, "error": exc.message}
            if full:
                self.applied.clear()
                self.keys.clear()
            for rec, is_removed in usable:
                self.seen[rec.id] = max(rec.generation, self.seen.get(rec.id, 0))
                if is_removed or rec.state != "bound":
                    self.applied.pop(rec.id, None)
                else:
                    self.applied[rec.id] = rec.generation
                    self.keys[rec.id] = (rec.account, rec.logical)
                reports.append({"record_id": rec.id, "generation": rec.generation,
                                "error": None})
        finally:
            if not finishing:
                self._lock.release()
        return {"reports": reports, "error": None, **extra}

    async def _finish(self, dp: Dataplane, pending: Pending) -> None:
        try:
            warnings = await asyncio.to_thread(dp.finish_links, pending)
            if warnings:
                log.warning("dataplane %s: %s", dp.host, "; ".join(warnings))
        except Exception:  # link work failing must not wedge the lock
            log.exception("finishing a records update failed")
        finally:
            self._lock.release()
        if pending.batch.flush:
            self._unflushed.append(pending)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_stale(dp))
                self._finishers.add(self._flusher)
                self._flusher.add_done_callback(self._finishers.discard)

    async def _flush_stale(self, dp: Dataplane) -> None:
        """Cleanup of flows that commits already fenced off: off the lock (flushes are
        serialized by the dataplane), the commits of :data:`FLUSH_WINDOW_S` in one
        cleanup; their ``stale`` elements go with a later commit.

        Each cleanup walks the kernel's whole conntrack table (a filtered delete ~0.1 ms +
        ~0.2 ms per 1,000 entries of the machine; a dump, where the filter cannot be used,
        ~10 ms however few entries match), so it waits: right after this host answered,
        the controller is pushing the same change to the next host (a move: the new
        host after the old one) and then answering its caller, and on a host with few
        cores the walk would take CPU from that path; and a burst of updates (moves,
        migrations) shares one cleanup per window. The flows are already cut (fence).
        """
        while self._unflushed:
            await asyncio.sleep(FLUSH_WINDOW_S)
            pendings, self._unflushed = self._unflushed, []
            try:
                _deleted, warning = await asyncio.to_thread(dp.flush_stale_many, pendings)
            except Exception:
                log.exception("conntrack cleanup after a records update failed")
                continue
            if warning is not None:
                log.warning("dataplane %s: %s", dp.host, warning)
                continue
            async with self._lock:
                for pending in pendings:
                    dp.flushed(pending)

    async def op_state(self, _payload: dict[str, Any]) -> dict[str, Any]:
        dp = self._need()
        return {"host": dp.host, "generation": dp.generation, "last_error": dp.last_error,
                "applied": {str(k): v for k, v in sorted(self.applied.items())},
                "instances": self.instance_names()}

    # -- instances -----------------------------------------------------------------------

    def _load_instances(self) -> None:
        from edgevisor.network.netns import netns_exists

        if self._path is None:
            return
        try:
            saved = json.loads(self._path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            saved = {}
        self.instances = {n: v for n, v in saved.items() if netns_exists(v["netns"])}

    def _save_instances(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.instances))
        os.replace(tmp, self._path)

    @staticmethod
    def _field(payload: dict[str, Any], key: str) -> str:
        v = payload.get(key)
        if not isinstance(v, str) or not v:
            raise RequestError(f"{key} is required (a non-empty string)")
        return v

    async def op_create(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``{"name", "account", "logical"}``: a netns behind a veth holding ``logical``."""
        from edgevisor.network.netns import create_instance

        dp = self._need()
        name = self._field(payload, "name")
        account = self._field(payload, "account")
        try:
            logical = ip_address(self._field(payload, "logical"))
        except ValueError as exc:
            raise RequestError(f"logical must be an IP address: {exc}") from exc
        if name in self.instances:
            raise RequestError(f"instance {name!r} already exists on this host")
        # The host name keeps namespaces apart when simulated hosts share one machine.
        netns = f"{self.cfg.instance_netns_prefix}{dp.host}-{name}"
        if len(netns) > 64 or "/" in netns:
            raise RequestError(f"instance name {name!r} is too long or has a '/'")
        async with self._lock:
            inst = await asyncio.to_thread(create_instance, netns, None, account, logical)
            await asyncio.to_thread(dp.plug, account, logical)
            self.instances[name] = {"netns": inst.netns, "account": account,
                                    "logical": str(logical), "ifname": inst.ifname}
            self._save_instances()
        await self._report_instances()
        return {"name": name, **self.instances[name]}

    async def op_remove(self, payload: dict[str, Any]) -> dict[str, Any]:
        from edgevisor.network.netns import delete_netns

        self._need()
        name = self._field(payload, "name")
        inst = self.instances.get(name)
        if inst is None:
            return {"name": name, "removed": False}
        async with self._lock:
            await asyncio.to_thread(delete_netns, inst["netns"])
            self.instances.pop(name, None)
            self._save_instances()
        await self._report_instances()
        return {"name": name, "removed": True}

    async def op_list(self, _payload: dict[str, Any]) -> dict[str, Any]:
        self._need()
        return {"instances": [{"name": n, **v} for n, v in sorted(self.instances.items())]}

    # -- instances of other capabilities (domains) ----------------------------------------

    def add_instance_source(self, source: Callable[[], Iterable[str]]) -> None:
        """Instances another capability runs (domains with a logical address), reported
        with this host's own so that leak collection sees them while they exist."""
        self._sources.append(source)

    def instance_names(self) -> list[str]:
        names = set(self.instances)
        for source in self._sources:
            names.update(source())
        return sorted(names)

    async def plug(self, account: str, logical: IPv4Address | IPv6Address) -> None:
        """Route ``logical`` to its instance's veth in the account's table, if its record
        is local here (a veth that appears after its record was applied has no route)."""
        if self.dp is None:
            return
        async with self._lock:
            await asyncio.to_thread(self.dp.plug, account, logical)

    async def report_instances(self) -> None:
        """Tell the controller which instances run here now (best effort)."""
        await self._report_instances()

    async def _report_instances(self) -> None:
        if self._agent is None:
            return
        try:
            await self._agent.request(
                "POST", f"/v1/hosts/{self._agent.host}/records/applied",
                {"reports": [], "instances": self.instance_names()},
            )
        except EdgevisorError as exc:  # the next connect reports again
            log.info("instances not reported: %s", exc.message)
