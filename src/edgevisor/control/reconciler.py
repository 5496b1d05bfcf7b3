"""Host liveness: a pure decision plus the loop that applies it.

``decide_down`` is the whole rule — a host that is up and has not been heard from for
``timeout_s`` goes down — so it is tested without a clock or a store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from starlette.concurrency import run_in_threadpool

from edgevisor.control.state import ControllerState
from edgevisor.store import repos

log = logging.getLogger(__name__)


def decide_down(
    hosts: Iterable[tuple[str, str, float]], now: float, timeout_s: float
) -> list[str]:
    """Names of hosts ``(name, state, last_heartbeat_at)`` to mark down."""
    return [name for name, state, last in hosts if state == "up" and now - last > timeout_s]


def mark_stale_hosts_down(st: ControllerState) -> list[str]:
    now = st.clock()
    timeout = st.settings.controller.heartbeat_timeout_s
    with st.store.session() as s:
        hosts = repos.stale_hosts(s, now - timeout)
        seen = ((h.name, h.state, h.last_heartbeat_at) for h in hosts)
        down = set(decide_down(seen, now, timeout))
        for h in hosts:
            if h.name in down:
                h.state = "down"
                h.state_changed_at = now
                repos.add_event(
                    s, "host.down", now, subject=h.name,
                    data={"last_heartbeat_at": h.last_heartbeat_at, "timeout_s": timeout},
                )
        return sorted(down)


async def run_liveness(st: ControllerState) -> None:
    interval = st.settings.controller.reconcile_interval_s
    while True:
        try:
            for name in await run_in_threadpool(mark_stale_hosts_down, st):
                log.warning("host %s missed its heartbeats: marked down", name)
        except Exception:  # the loop must outlive a transient store error
            log.exception("host liveness check failed; retrying")
        await asyncio.sleep(interval)
