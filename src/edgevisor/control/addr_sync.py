"""Address records to hosts: store access, pushes after changes, drift repair, leaks.

Theory of operation
-------------------
The store is the truth; hosts converge on it. A host needs every bound record of each
account that has a bound instance on it (:func:`records_for_host`), and must drop what it
applied before and no longer needs (:func:`removed_for_host`).

- After a change of record R of account A, the API pushes (best effort) to the hosts that
  needed A's records before or after the change. Hosts in both sets get the one-record
  delta; hosts that just joined or left A's set get their full set (they lack, or must
  drop, A's other records). The host that gives up a mapping (old host of a move) is
  pushed first, then the rest concurrently, so two hosts translate one record only while
  the old host is unreachable (then it is down, and its table no longer matters).
  The agent endpoints are read in the change's own transaction (no store access, no
  thread hop between the pushes). Why the old host is not pushed concurrently with the
  new one, even though the physical address changes: both would hold a *local* mapping
  of the record for up to one round trip (two hosts translating it, each answering for
  its own physical address), which is exactly what fencing excludes; sequential pushes
  make the window break-before-make instead (packets to the record are dropped, never
  delivered to the instance the record is leaving).
- An agent answers a push with the generation it applied per record (or the error; it
  keeps its last good table); the controller stores that (``address_host_applied``).
- :func:`run_records_reconciler` pushes the full set again to every up host that lags on
  any record (failed or missed push, restart); hosts that are down are skipped.
- :func:`run_leak_collector` releases bound addresses whose instance has been missing
  (as reported by its host) for the grace period, and ends hold-downs that are over.

On SQLite the network operations use their own engine with ``BEGIN IMMEDIATE`` (as
:mod:`edgevisor.network.pools` requires); on PostgreSQL they share the store's engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, create_engine, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from edgevisor.control.state import ControllerState
from edgevisor.errors import EdgevisorError, PeerUnavailable
from edgevisor.network import host_reports, records
from edgevisor.network.fast_alloc import FastAllocator
from edgevisor.network.lifecycle import State
from edgevisor.network.pools import REC
from edgevisor.network.records import AddressRecord
from edgevisor.sdk import addresses as w
from edgevisor.store import repos
from edgevisor.store.models import Account
from edgevisor.store.network_models import HostApplied

__all__ = [
    "NetStore",
    "Push",
    "account_hosts",
    "host_payload",
    "net_store",
    "push",
    "record_out",
    "resolve_endpoints",
    "run_leak_collector",
    "run_records_reconciler",
]

log = logging.getLogger(__name__)
_APPLIED: Table = HostApplied.__table__  # type: ignore[assignment]


class NetStore:
    """Sessions for the network tables (``BEGIN IMMEDIATE`` on SQLite)."""

    def __init__(self, st: ControllerState) -> None:
        url = st.store.url
        if url.startswith("sqlite"):
            self.engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            records.configure_sqlite(self.engine)
            self._own = True
        else:
            self.engine = st.store.engine
            self._own = False
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reconciler back-off per host that keeps failing: host -> (next try, delay s).
        self.backoff: dict[str, tuple[float, float]] = {}

    @functools.cached_property
    def allocator(self) -> FastAllocator:
        """The allocation hot path on its own connection (bulk callers; see fast_alloc)."""
        return FastAllocator(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception."""
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        if "allocator" in self.__dict__:
            self.allocator.close()
        if self._own:
            self.engine.dispose()


def net_store(st: ControllerState) -> NetStore:
    """The :class:`NetStore` of a controller, made on first use, disposed with it."""
    ns: NetStore | None = getattr(st, "_edgevisor_netstore", None)
    if ns is None:
        ns = NetStore(st)
        object.__setattr__(st, "_edgevisor_netstore", ns)
        weakref.finalize(st, ns.dispose)
    return ns


# --- conversions and queries ------------------------------------------------------------


def record_out(r: AddressRecord) -> w.AddressRecord:
    return w.AddressRecord(
        id=r.id, account=r.account, network_id=r.network_id, logical=r.logical,
        physical=r.physical, host=r.host, instance=r.instance, state=r.state.value,
        generation=r.generation, held_until=r.held_until, created_at=r.created_at,
        updated_at=r.updated_at,
    )


def account_hosts(s: Session, account: str) -> set[str]:
    """Hosts running a bound instance of ``account``: the hosts that need its records."""
    rows = s.execute(
        select(REC.c.host).distinct()
        .where(REC.c.account == account, REC.c.state == State.BOUND.value)
    ).scalars()
    return {h for h in rows if h}


def removed_for_host(s: Session, host: str, needed: Iterable[int]) -> list[AddressRecord]:
    """Records ``host`` reported applying that it must no longer translate."""
    keep = set(needed)
    ids = [i for i in s.execute(select(_APPLIED.c.record_id).where(_APPLIED.c.host == host))
           .scalars() if i not in keep]
    if not ids:
        return []
    rows = s.execute(select(REC).where(REC.c.id.in_(ids)).order_by(REC.c.id))
    return [records.record_view(r) for r in rows]


def host_payload(s: Session, host: str) -> w.HostRecords:
    needed = host_reports.records_for_host(s, host=host)
    removed = removed_for_host(s, host, (r.id for r in needed))
    return w.HostRecords(host=host, records=[record_out(r) for r in needed],
                         removed=[record_out(r) for r in removed])


def lagging(s: Session, host: str) -> bool:
    """Whether ``host`` has not applied the current generation of a record it needs or of
    one it applied before (then it must drop it)."""
    applied = {r.record_id: r.generation for r in s.execute(
        select(_APPLIED.c.record_id, _APPLIED.c.generation).where(_APPLIED.c.host == host))}
    for r in host_reports.records_for_host(s, host=host):
        if applied.pop(r.id, None) != r.generation:
            return True
    if not applied:
        return False
    current = s.execute(select(REC.c.id, REC.c.generation).where(REC.c.id.in_(applied)))
    return any(gen > applied[rid] for rid, gen in current)


# --- pushes ----------------------------------------------------------------------------------


@dataclass
class Push:
    """Which hosts get what after one change (see the theory of operation)."""

    record: AddressRecord
    before: set[str]
    after: set[str]
    first: str | None = None  # the host giving up a local mapping: pushed before the others
    results: dict[str, str] = field(default_factory=dict)  # host -> "ok" or the error
    # host -> (agent url, key), or why it cannot be reached; resolved in the change's own
    # transaction (:func:`resolve_endpoints`) so a push needs no further store access.
    endpoints: dict[str, tuple[str, str] | str] = field(default_factory=dict)

    def targets(self) -> list[tuple[str, bool]]:
        """``(host, full)`` pairs; the ``first`` host first."""
        hosts = sorted(self.before | self.after)
        if self.first in hosts:
            hosts.remove(self.first)
            hosts.insert(0, self.first)
        return [(h, h not in (self.before & self.after)) for h in hosts]


def resolve_endpoints(s: Session, st: ControllerState, change: Push) -> None:
    """Fill ``change.endpoints`` for the hosts the change goes to (not in-process ones)."""
    for host, _full in change.targets():
        if st.links.is_local(host):
            continue
        try:
            change.endpoints[host] = st.links.endpoint_in(s, host)
        except EdgevisorError as exc:
            change.endpoints[host] = exc.message


async def _store(st: ControllerState, fn: Any, *args: Any) -> Any:
    def run() -> Any:
        with net_store(st).session() as s:
            return fn(s, *args)

    return await run_in_threadpool(run)


def _report(s: Session, host: str, result: Any) -> None:
    reps = result.get("reports", []) if isinstance(result, dict) else []
    host_reports.report_applied(s, host=host, reports=[
        host_reports.AppliedReport(record_id=int(r["record_id"]),
                                   generation=int(r["generation"]), error=r.get("error"))
        for r in reps
    ])


async def push_host(
    st: ControllerState, host: str, *, full: bool, record: AddressRecord | None = None,
    reports: list[tuple[str, Any]] | None = None,
    endpoint: tuple[str, str] | str | None = None,
) -> str:
    """Send ``host`` its full set or one record; "ok" or the error. What the host reports
    is stored now, or appended to ``reports`` for the caller to store later. ``endpoint``:
    the host's agent address as resolved beforehand, or why it is unreachable."""
    if isinstance(endpoint, str):
        log.debug("records for %s not pushed: %s", host, endpoint)
        return endpoint
    if full or record is None:
        payload = await _store(st, host_payload, host)
        body: dict[str, Any] = {"full": True, **payload.model_dump(mode="json")}
    else:
        body = {"full": False, "records": [record_out(record).model_dump(mode="json")],
                "removed": []}
    timeout = st.settings.network.push_timeout_s
    try:
        result = await st.links.call(host, "records.apply", body, timeout_s=timeout,
                                     endpoint=endpoint)
    except PeerUnavailable as exc:
        log.debug("records for %s not pushed: %s", host, exc.message)
        return exc.message
    except EdgevisorError as exc:
        log.warning("host %s refused records: %s", host, exc.message)
        return exc.message
    if reports is not None:
        reports.append((host, result))
        return _outcome(result)
    try:
        await _store(st, _report, host, result)
    except EdgevisorError as exc:
        log.warning("report of host %s not stored: %s", host, exc.message)
        return exc.message
    return _outcome(result)


def _outcome(result: Any) -> str:
    errors = [r.get("error") for r in (result or {}).get("reports", []) if r.get("error")]
    return "ok" if not errors else str(errors[0])


def _report_many(s: Session, got: list[tuple[str, Any]]) -> None:
    for host, result in got:
        _report(s, host, result)


_BACKGROUND: set[asyncio.Task[Any]] = set()


async def _store_reports(st: ControllerState, got: list[tuple[str, Any]]) -> None:
    try:
        await _store(st, _report_many, got)
    except Exception:  # the reconciler pushes again to a host whose report is missing
        log.exception("storing what hosts applied failed")


async def push(st: ControllerState, change: Push) -> Push:
    """Push one change to every host concerned; failures are left to the reconciler.

    Returns once every host answered (applied, failed or unreachable); what they applied
    is stored in one transaction right after, without holding up the caller.
    """
    targets = change.targets()
    got: list[tuple[str, Any]] = []
    if targets and targets[0][0] == change.first:
        host, full = targets.pop(0)
        change.results[host] = await push_host(st, host, full=full, record=change.record,
                                               reports=got,
                                               endpoint=change.endpoints.get(host))
    outcomes = await asyncio.gather(
        *(push_host(st, h, full=f, record=change.record, reports=got,
                    endpoint=change.endpoints.get(h)) for h, f in targets)
    )
    change.results.update({h: r for (h, _), r in zip(targets, outcomes, strict=True)})
    if got:
        task = asyncio.create_task(_store_reports(st, got))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
    return change


# --- background loops ------------------------------------------------------------------------


def _lagging_hosts(s: Session) -> list[str]:
    return [h.name for h in repos.list_hosts(s) if h.state == "up" and lagging(s, h.name)]


MAX_BACKOFF_S = 60.0


async def reconcile_once(st: ControllerState) -> dict[str, str]:
    """Push the full set to each up host that lags; the result per host pushed.

    A host that keeps failing (unreachable, or refusing a record it cannot translate)
    is retried with an exponential back-off up to :data:`MAX_BACKOFF_S`.
    """
    ns = net_store(st)
    now = st.clock()
    hosts = [h for h in await _store(st, _lagging_hosts)
             if ns.backoff.get(h, (0.0, 0.0))[0] <= now]
    got = await asyncio.gather(*(push_host(st, h, full=True) for h in hosts))
    interval = st.settings.network.reconcile_interval_s
    for host, result in zip(hosts, got, strict=True):
        if result == "ok":
            ns.backoff.pop(host, None)
        else:
            delay = min(MAX_BACKOFF_S, max(interval, 2 * ns.backoff.get(host, (0, 0))[1]))
            ns.backoff[host] = (now + delay, delay)
    return dict(zip(hosts, got, strict=True))


async def run_records_reconciler(st: ControllerState) -> None:
    """Repair drift for the controller's whole life (see the theory of operation)."""
    while True:
        try:
            for host, result in (await reconcile_once(st)).items():
                if result != "ok":
                    log.info("host %s still behind on records: %s", host, result)
        except Exception:  # the loop must outlive a transient store or agent error
            log.exception("records reconciliation failed; retrying")
        await asyncio.sleep(st.settings.network.reconcile_interval_s)


def collect_once(s: Session, settings: Any, now: float) -> list[AddressRecord]:
    leaked = host_reports.collect_leaks(s, settings=settings)
    records.expire_holds(s)
    for r in leaked:
        acct = s.execute(select(Account.id).where(Account.name == r.account)).scalar()
        repos.add_event(s, "address.leak_collected", now, subject=r.logical, account_id=acct,
                        data={"record": r.id, "account": r.account,
                              "generation": r.generation})
    return leaked


async def run_leak_collector(st: ControllerState) -> None:
    """Leak collection and hold-down expiry on a timer; hosts converge by reconciliation."""
    while True:
        await asyncio.sleep(st.settings.network.leak_interval_s)
        try:
            leaked = await _store(st, collect_once, st.settings.network.ipam(), st.clock())
            for r in leaked:
                log.warning("address %s of %s leaked (instance gone): released",
                            r.logical, r.account)
        except Exception:
            log.exception("leak collection failed; retrying")
