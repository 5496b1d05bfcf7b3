"""Address records to hosts: store access, pushes after changes, drift repair, leaks.

Theory of operation
-------------------
The store is the truth; hosts converge on it. A host needs every bound record of each
account that has a bound instance on it (:func:`records_for_host`), and must drop what it
applied before and no longer needs (:func:`removed_for_host`).

- After a change of record R of account A, the API pushes (best effort) to the hosts that
  needed A's records before or after the change. Every push is a delta: hosts in both
  sets get R alone; a host that just joined A's set gets A's bound records; a host that
  left it gets A's records as removals (what it may hold of A, R included). The bodies
  and the agent endpoints are computed in the change's own transaction
  (:func:`resolve_endpoints`), so the pushes need no store access and no thread hop.
- Fencing ("at most one host translates R at any moment"). A host *translates* R when
  it holds R's local mapping (R's physical address on its fabric, ``in_dnat`` to R's
  instance, ``out_snat`` from it). The old host of a move (``Push.first``) is pushed
  first and alone; only when it acknowledged that the mapping is gone (or is
  unreachable: then it is down or cut off, and what it holds reaches nobody through
  the hosts we can reach) do the new host and the peers get R. Pushing the old and the
  new host concurrently was measured and rejected: the physical address changes on a
  move, so the two mappings do not collide, but for up to one round trip both hosts
  would answer for R, each delivering to its own instance (peers updated early reach
  the new one, peers updated late the old one): two hosts translating, which is
  exactly what fencing excludes, and a generation number does not help because a host
  cannot tell from its own push whether the other has applied its own. Sequential
  pushes make the window break-before-make instead: packets to R are dropped for that
  window, never delivered to the instance R is leaving. Peers are not part of the
  fence (their ``out_dnat`` only chooses where packets go; with no local mapping at the
  destination they are dropped), so they go with the new host. The fence costs one
  round trip to the old host (~1 ms on a kept-alive connection); the API call returns
  after both pushes were acknowledged, so a caller (the migration's switch) can rely on
  it. Pushes to remote agents go over aiohttp (:mod:`.agent_http`: ~4 ms less per
  round trip than httpx under load here; over the agent's push channel, a WebSocket,
  when it is open), to an in-process agent straight to its router. While the old host
  applies, the others with an open channel get a ``records.prepare`` of their body
  (staged, nothing in the kernel) and, after the old host's answer, a tiny
  ``records.commit`` (:mod:`.addr_fence`): their work leaves the critical path, and
  the fence is unchanged (nothing is applied on them before that answer).
- An agent answers a push with the generation it applied per record (or the error; it
  keeps its last good table); the controller stores that (``address_host_applied``),
  in order, in one transaction per burst of pushes, right after the API call answered
  (:class:`ReportWriter`): a report lost to a crash is repaired by the reconciler.
- :func:`~.addr_loops.run_records_reconciler` pushes the full set again to every up host
  that lags on any record (failed or missed push, restart); hosts that are down are
  skipped.
- :func:`~.addr_loops.run_leak_collector` releases bound addresses whose instance has been
  missing (as reported by its host) for the grace period, and ends hold-downs that are
  over.

On SQLite the network operations use their own engine with ``BEGIN IMMEDIATE`` (as
:mod:`edgevisor.network.pools` requires); on PostgreSQL they share the store's engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from edgevisor.control.links import AgentLinks
from edgevisor.control.net_store import NetStore, net_store
from edgevisor.control.state import ControllerState
from edgevisor.errors import EdgevisorError, PeerUnavailable
from edgevisor.network import host_reports, records
from edgevisor.network.lifecycle import State
from edgevisor.network.pools import REC
from edgevisor.network.records import AddressRecord
from edgevisor.sdk import addresses as w
from edgevisor.store import repos
from edgevisor.store.models import Host
from edgevisor.store.network_models import HostApplied

if TYPE_CHECKING:
    from edgevisor.control.addr_fence import Prepares
    from edgevisor.control.agent_http import AgentHttp

__all__ = [
    "NetStore",
    "Push",
    "ReportWriter",
    "account_hosts",
    "add_record_event",
    "agent_http",
    "bound_per_host",
    "ensure_default_pool",
    "event_data",
    "host_payload",
    "in_store",
    "lagging",
    "net_store",
    "push",
    "push_change",
    "push_host",
    "record_out",
    "record_ref",
    "report_writer",
    "resolve_endpoints",
    "stage_change",
]

log = logging.getLogger(__name__)
_APPLIED: Table = HostApplied.__table__  # type: ignore[assignment]


def agent_http(st: ControllerState) -> AgentHttp | None:
    """The pushes' transport to remote agents (aiohttp; see :mod:`.agent_http`), made on
    first use; None when the controller's links are not :class:`AgentLinks` (a test's
    stand-in) or aiohttp is missing: then the links carry the pushes."""
    if not isinstance(st.links, AgentLinks):
        return None
    got: AgentHttp | None = getattr(st, "_edgevisor_agent_http", None)
    if got is None:
        try:
            from edgevisor.control.agent_http import AgentHttp
        except ImportError:  # pragma: no cover - aiohttp is a dependency
            log.warning("aiohttp is not installed: records pushes use httpx (slower)")
            return None
        got = AgentHttp()
        object.__setattr__(st, "_edgevisor_agent_http", got)
    return got


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
    # host -> the ``records.apply`` body for it, made in the same transaction.
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def targets(self) -> list[tuple[str, bool]]:
        """``(host, full)`` pairs; the ``first`` host first."""
        hosts = sorted(self.before | self.after)
        if self.first in hosts:
            hosts.remove(self.first)
            hosts.insert(0, self.first)
        return [(h, h not in (self.before & self.after)) for h in hosts]


def record_ref(ref: str) -> records.RecordRef:
    """A record named by its id (digits) or its logical address."""
    return int(ref) if ref.isdigit() else ref


def event_data(rec: AddressRecord) -> dict[str, Any]:
    """What a record's history event carries."""
    return {"record": rec.id, "state": rec.state.value, "generation": rec.generation,
            "host": rec.host, "instance": rec.instance, "physical": rec.physical}


def add_record_event(
    s: Session, st: ControllerState, kind: str, account_id: int | None, rec: AddressRecord
) -> None:
    repos.add_event(s, kind, st.clock(), subject=rec.logical, account_id=account_id,
                    data=event_data(rec))


def ensure_default_pool(s: Session, st: ControllerState, logical: str) -> None:
    """Create the default physical pool on first use when the settings name one."""
    cfg = st.settings.network
    if cfg.default_physical_cidr is None:
        return
    fam = 6 if ":" in logical else 4
    pools = records.list_physical_pools(s)
    if any(x.host_group == cfg.host_group and x.family == fam for x in pools):
        return
    if (":" in cfg.default_physical_cidr) == (fam == 6):
        records.create_physical_pool(s, host_group=cfg.host_group,
                                     cidr=cfg.default_physical_cidr)


def stage_change(
    s: Session,
    st: ControllerState,
    *,
    account: str,
    account_id: int | None,
    kind: str,
    op: Callable[[Session], AddressRecord | None],
    first: str | None = None,
) -> Push | None:
    """One record change inside the caller's transaction: ``op``, its history event, and
    the push it needs (endpoints and bodies resolved here, so the push touches no store).
    ``first`` is the host giving the record up (pushed first). None: nothing changed."""
    before = account_hosts(s, account)
    rec = op(s)
    if rec is None:
        return None
    add_record_event(s, st, kind, account_id, rec)
    change = Push(rec, before, account_hosts(s, account), first=first)
    resolve_endpoints(s, st, change)
    return change


async def push_change(st: ControllerState, change: Push) -> None:
    """Push a staged change to the hosts it concerns (none: nothing to do)."""
    if change.before or change.after:
        await push(st, change)


def resolve_endpoints(s: Session, st: ControllerState, change: Push) -> None:
    """Fill ``change.endpoints`` and ``change.bodies`` for the hosts the change goes to,
    in the change's own transaction (see the theory of operation)."""

    def bound() -> list[AddressRecord]:
        rows = s.execute(select(REC).where(REC.c.account == change.record.account,
                                           REC.c.state == State.BOUND.value)
                         .order_by(REC.c.id))  # fmt: skip
        return [records.record_view(r) for r in rows]

    def hosts(names: list[str]) -> dict[str, Any]:
        q = select(Host.name, Host.agent_url, Host.agent_key, Host.state)
        return {r.name: r for r in s.execute(q.where(Host.name.in_(names)))}

    plan_push(
        change,
        is_local=st.links.is_local,
        bound=bound,
        hosts=hosts,
        applied=lambda host: _applied_of_account(s, host, change.record.account),
    )


def plan_push(
    change: Push,
    *,
    is_local: Callable[[str], bool],
    bound: Callable[[], list[AddressRecord]],
    hosts: Callable[[list[str]], dict[str, Any]],
    applied: Callable[[str], Iterable[AddressRecord]],
) -> None:
    """The bodies and endpoints of ``change``, from the store through three readers (so
    a path on its own connection, :mod:`.addr_move`, plans the very same pushes): the
    account's bound records (read only when a host joins or leaves the account's set),
    the ``hosts`` rows of the remote targets, and what a leaving host applied of the
    account. A joining host gets every bound record, a leaving one the removal of all it
    may hold, any other the one record."""
    joined = change.after - change.before
    left = change.before - change.after
    account_bound = [_wire(r) for r in bound()] if joined or left else []
    one = [_wire(change.record)]
    targets = change.targets()
    remote = [h for h, _ in targets if not is_local(h)]
    rows = hosts(remote) if remote else {}
    for host, _full in targets:
        if host in joined:
            body = {"full": False, "records": account_bound, "removed": []}
        elif host in left:
            gone = {r["id"]: r for r in account_bound}
            gone[change.record.id] = one[0]
            for r in applied(host):
                gone.setdefault(r.id, _wire(r))
            body = {"full": False, "records": [], "removed": list(gone.values())}
        else:
            body = {"full": False, "records": one, "removed": []}
        change.bodies[host] = body
        if host in remote:
            change.endpoints[host] = _endpoint(host, rows.get(host))


def _endpoint(host: str, h: Any) -> tuple[str, str] | str:
    """``(agent url, key)`` of an up host, or why it cannot be called (as
    :meth:`~edgevisor.control.links.AgentLinks.endpoint_in` says it)."""
    if h is None:
        return f"host {host!r} not found"
    if not h.agent_url or not h.agent_key:
        return f"host {host!r} has not reported an agent address yet"
    if h.state != "up":
        return f"host {host!r} is down"
    return str(h.agent_url), str(h.agent_key)


def bound_per_host(s: Session, account: str) -> dict[str, int]:
    """Bound records of ``account`` per host (its hosts: :func:`account_hosts`)."""
    rows = s.execute(
        select(REC.c.host, func.count()).where(REC.c.account == account,
                                               REC.c.state == State.BOUND.value)
        .group_by(REC.c.host)
    )
    return {h: int(n) for h, n in rows if h}


def _wire(r: AddressRecord) -> dict[str, Any]:
    """A record as ``records.apply`` takes it (what the agent's ``WireRecord`` reads)."""
    return {"id": r.id, "account": r.account, "logical": r.logical, "physical": r.physical,
            "host": r.host, "state": r.state.value, "generation": r.generation}


def _applied_of_account(s: Session, host: str, account: str) -> list[AddressRecord]:
    """Records of ``account`` that ``host`` reported applying (it may still hold them)."""
    rows = s.execute(
        select(REC).join(_APPLIED, _APPLIED.c.record_id == REC.c.id)
        .where(_APPLIED.c.host == host, REC.c.account == account)
    )
    return [records.record_view(r) for r in rows]


async def in_store(st: ControllerState, fn: Any, *args: Any) -> Any:
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
    body: dict[str, Any] | None = None,
) -> str:
    """Send ``host`` its full set, one record, or ``body`` as made beforehand; "ok" or the
    error. What the host reports is stored now, or appended to ``reports`` for the caller
    to store later. ``endpoint``: the host's agent address as resolved beforehand, or why
    it is unreachable."""
    if isinstance(endpoint, str):
        log.debug("records for %s not pushed: %s", host, endpoint)
        return endpoint
    if body is None and (full or record is None):
        payload = await in_store(st, host_payload, host)
        body = {"full": True, **payload.model_dump(mode="json")}
    elif body is None:
        assert record is not None
        body = {"full": False, "records": [_wire(record)], "removed": []}
    timeout = st.settings.network.push_timeout_s
    fast = agent_http(st) if endpoint is not None else None
    try:
        if fast is not None and endpoint is not None and not st.links.is_local(host):
            result = await fast.call(host, "records.apply", body, endpoint=endpoint,
                                     timeout_s=timeout)
        else:
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
        await in_store(st, _report, host, result)
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


class ReportWriter:
    """Stores what hosts reported after pushes, off the API call's path.

    Reports queue in arrival order and are written in one transaction per burst, a short
    moment after the first of the burst (:data:`REPORT_DELAY_S`): the API call that
    pushed has answered by then, so the write neither delays it nor competes with it
    for the interpreter, and a stream of changes costs one commit per burst instead of
    one per change. A crash loses at most the queued reports; the hosts then look
    behind and the reconciler pushes to them again (nothing else depends on them).
    """

    def __init__(self, st: ControllerState) -> None:
        self._st = st
        self._queue: list[tuple[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, got: list[tuple[str, Any]]) -> None:
        self._queue.extend(got)
        loop = asyncio.get_running_loop()
        # A drain started in another event loop (a test client's loop per request) may
        # never run again: start one in this loop.
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._task = loop.create_task(self._drain())
            _BACKGROUND.add(self._task)
            self._task.add_done_callback(_BACKGROUND.discard)

    async def flush(self) -> None:
        """Wait until every queued report is stored (tests, shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)


    async def _drain(self) -> None:
        while self._queue:
            await asyncio.sleep(REPORT_DELAY_S)
            batch, self._queue = self._queue, []
            try:
                await in_store(self._st, _report_many, batch)
            except Exception:  # the reconciler pushes again to a host whose report is missing
                log.exception("storing what hosts applied failed")


#: How long after a burst's first report it is stored (see :class:`ReportWriter`).
REPORT_DELAY_S = 0.02
_BACKGROUND: set[asyncio.Task[Any]] = set()  # strong references to running drains


def report_writer(st: ControllerState) -> ReportWriter:
    ns = net_store(st)
    if ns.reports is None:
        ns.reports = ReportWriter(st)
    return ns.reports


async def push(st: ControllerState, change: Push) -> Push:
    """Push one change to every host concerned; failures are left to the reconciler.

    Returns once every host answered (applied, failed or unreachable), the ``first`` host
    before any other was sent anything (fencing); what they applied is stored right
    after (:class:`ReportWriter`), without holding up the caller.
    """
    targets = change.targets()
    got: list[tuple[str, Any]] = []
    prepares: Prepares | None = None
    if targets and targets[0][0] == change.first:
        host, full = targets.pop(0)
        # The others stage their bodies meanwhile (no kernel change: see addr_fence).
        prepares = _prepares(st, change, [h for h, _ in targets])
        try:
            change.results[host] = await push_host(st, host, full=full, record=change.record,
                                                   reports=got,
                                                   endpoint=change.endpoints.get(host),
                                                   body=change.bodies.get(host))
        except BaseException:
            if prepares is not None:
                await prepares.cancel()
            raise

    def one(h: str, f: bool) -> Awaitable[str]:
        def plain() -> Awaitable[str]:
            return push_host(st, h, full=f, record=change.record, reports=got,
                             endpoint=change.endpoints.get(h), body=change.bodies.get(h))

        if prepares is not None and h in prepares:
            return prepares.commit(h, got, plain, _outcome)
        return plain()

    if len(targets) == 1:  # the common case: no gather (one task less per change)
        (h, f), = targets
        outcomes = [await one(h, f)]
    else:
        outcomes = await asyncio.gather(*(one(h, f) for h, f in targets))
    change.results.update({h: r for (h, _), r in zip(targets, outcomes, strict=True)})
    if got:
        report_writer(st).add(got)
    return change


def _prepares(st: ControllerState, change: Push, rest: list[str]) -> Prepares | None:
    """Prepares for the hosts after the fence whose push channel is open (addr_fence)."""
    fast = agent_http(st) if rest else None
    if fast is None:
        return None
    from edgevisor.control.addr_fence import Prepares, prepare_targets

    hosts = prepare_targets([h for h in rest if not st.links.is_local(h)], change.endpoints,
                            change.bodies, fast.channel_open)
    if not hosts:
        return None
    return Prepares(fast, change, hosts, timeout_s=st.settings.network.push_timeout_s)
