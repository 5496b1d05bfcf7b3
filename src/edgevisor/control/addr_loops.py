"""The address records' background loops: drift repair and leak collection.

The theory of operation is in :mod:`.addr_sync`: the store is the truth and hosts
converge on it. These loops run for the controller's whole life: one pushes the full set
again to every up host that lags on any record, the other releases addresses whose
instance is gone and ends hold-downs that are over.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgevisor.control.addr_sync import in_store, lagging, net_store, push_host
from edgevisor.control.state import ControllerState
from edgevisor.network import host_reports, records
from edgevisor.network.records import AddressRecord
from edgevisor.store import repos
from edgevisor.store.models import Account

if TYPE_CHECKING:
    from edgevisor.control.agent_http import AgentHttp

__all__ = [
    "MAX_BACKOFF_S",
    "collect_once",
    "reconcile_once",
    "run_leak_collector",
    "run_records_reconciler",
]

log = logging.getLogger(__name__)


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
    hosts = [
        h for h in await in_store(st, _lagging_hosts) if ns.backoff.get(h, (0.0, 0.0))[0] <= now
    ]
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
    """Repair drift for the controller's whole life (see the theory of operation);
    closes the pushes' HTTP connections when the controller stops."""
    try:
        while True:
            try:
                for host, result in (await reconcile_once(st)).items():
                    if result != "ok":
                        log.info("host %s still behind on records: %s", host, result)
            except Exception:  # the loop must outlive a transient store or agent error
                log.exception("records reconciliation failed; retrying")
            await asyncio.sleep(st.settings.network.reconcile_interval_s)
    finally:
        agents: AgentHttp | None = getattr(st, "_edgevisor_agent_http", None)
        if agents is not None:
            await agents.aclose()


def collect_once(s: Session, settings: Any, now: float) -> list[AddressRecord]:
    leaked = host_reports.collect_leaks(s, settings=settings)
    records.expire_holds(s)
    for r in leaked:
        acct = s.execute(select(Account.id).where(Account.name == r.account)).scalar()
        repos.add_event(
            s,
            "address.leak_collected",
            now,
            subject=r.logical,
            account_id=acct,
            data={"record": r.id, "account": r.account, "generation": r.generation},
        )
    return leaked


async def run_leak_collector(st: ControllerState) -> None:
    """Leak collection and hold-down expiry on a timer; hosts converge by reconciliation."""
    while True:
        await asyncio.sleep(st.settings.network.leak_interval_s)
        try:
            leaked = await in_store(st, collect_once, st.settings.network.ipam(), st.clock())
            for r in leaked:
                log.warning(
                    "address %s of %s leaked (instance gone): released", r.logical, r.account
                )
        except Exception:
            log.exception("leak collection failed; retrying")
