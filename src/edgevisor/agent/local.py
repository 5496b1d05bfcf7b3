"""Process entry points: ``up`` (controller + one agent), ``controller``, ``agent``."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from edgevisor.agent.addresses import AddressesCapability
from edgevisor.agent.daemon import Agent
from edgevisor.agent.devices import DevicesCapability
from edgevisor.agent.domains import DomainsCapability
from edgevisor.agent.migration import MigrationCapability
from edgevisor.agent.tasks import TasksCapability
from edgevisor.agent.volumes import VolumesCapability
from edgevisor.lockfile import DataDirLock
from edgevisor.settings import Settings

log = logging.getLogger(__name__)


def build_agent(settings: Settings) -> Agent:
    """The agent with every capability this host runs."""
    agent = Agent(settings)
    agent.add(TasksCapability(settings))
    agent.add(AddressesCapability(settings))
    agent.add(DevicesCapability(settings))
    agent.add(VolumesCapability(settings))
    # before domains: it keeps a domain whose migration here is unfinished from restarting
    agent.add(MigrationCapability())
    agent.add(DomainsCapability(settings))  # after volumes: it uses them
    return agent


async def run_controller(settings: Settings) -> None:
    from edgevisor.control.server import serve  # the agent alone never loads the controller
    lock = DataDirLock(settings.data_dir)
    lock.acquire()
    _cancel_on_signals()
    try:
        await serve(settings)
    finally:
        lock.release()


def _cancel_on_signals() -> None:
    """SIGTERM/SIGINT cancel the main task, so every ``finally`` runs (cleanup)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)


async def run_agent(settings: Settings) -> None:
    agent_dir = settings.data_dir / "agent" / settings.agent.host_name
    lock = DataDirLock(agent_dir)
    lock.acquire()
    _cancel_on_signals()
    try:
        await build_agent(settings).run()
    finally:
        lock.release()


async def run_up(settings: Settings) -> None:
    """Controller and an agent in one process; the agent joins over the local API."""
    from edgevisor.control.server import serve
    lock = DataDirLock(settings.data_dir)
    lock.acquire()
    _cancel_on_signals()

    async def start_agent(st: Any) -> None:  # a ControllerState
        c = settings.controller
        host = "127.0.0.1" if c.listen_host in ("0.0.0.0", "::", "") else c.listen_host
        url = f"http://{host}:{c.listen_port}"
        agent_settings = settings.model_copy(
            update={"agent": settings.agent.model_copy(update={"controller_url": url})}
        )
        agent = build_agent(agent_settings)
        if agent.load_credential() is None:
            from edgevisor.store import repos

            with st.store.session() as s:
                _jt, secret = repos.create_join_token(
                    s, st.clock(), 300.0, settings.agent.host_name
                )
            agent.join_token = secret
        log.info("local agent %s joining %s", settings.agent.host_name, url)
        st.links.attach_local(settings.agent.host_name, agent.router)
        try:
            await agent.run(serve_api=False)
        finally:
            st.links.detach_local(settings.agent.host_name)

    try:
        await serve(settings, on_ready=start_agent)
    finally:
        lock.release()
        await asyncio.sleep(0)
