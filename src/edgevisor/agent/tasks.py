"""The coordinator as an agent capability: tasks and calls of every account on this host.

Tasks of different accounts share the host's coordinator (one queue, one budget), so the
agent names them ``<account>.<task>``; account names have no dots, so the split is exact.
The controller only ever passes the account it authenticated, so one account cannot reach
another's tasks through these operations.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

from edgevisor.errors import NotFound, RequestError
from edgevisor.settings import Settings
from edgevisor.tasks.calls import CallRecord, TaskVersion
from edgevisor.tasks.sandbox import (
    default_factory,
    plain_isolation_warning,
)
from edgevisor.tasks.service import Coordinator

if TYPE_CHECKING:
    from edgevisor.agent.daemon import Agent

log = logging.getLogger(__name__)
MAX_NAME = 63


def qualified(account: str, name: str) -> str:
    full = f"{account}.{name}"
    if len(full) > MAX_NAME:
        raise RequestError(
            f"account and task name together are {len(full)} characters; the limit is "
            f"{MAX_NAME - 1} (account {account!r}, task {name!r})"
        )
    return full


def split(qualified_name: str) -> tuple[str, str]:
    account, _, name = qualified_name.partition(".")
    return account, name


def task_json(tv: TaskVersion) -> dict[str, Any]:
    account, name = split(tv.name)
    out = tv.model_dump(mode="json")
    out.update(name=name, account=account)
    out["spec"]["name"] = name
    return out


def call_json(rec: CallRecord) -> dict[str, Any]:
    account, name = split(rec.task)
    out = rec.model_dump(mode="json")
    out.update(task=name, account=account)
    return out


class TasksCapability:
    """Runs the host's :class:`Coordinator` and answers the ``tasks.*`` operations."""

    name = "tasks"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.coordinator: Coordinator | None = None
        self._factory: Any = None

    def _dir(self, agent: Agent) -> Any:
        return agent.dir / "tasks"

    async def start(self, agent: Agent) -> None:
        data = self._dir(agent)
        data.mkdir(parents=True, exist_ok=True)
        sandbox = self.settings.sandbox
        if sandbox.runtime_dir is None:  # staged once per host, not per process in /tmp
            sandbox = sandbox.model_copy(update={"runtime_dir": data / "runtime"})
        self._factory = default_factory(sandbox)
        if not self._factory.isolated:
            log.warning(plain_isolation_warning())
        else:
            from edgevisor.tasks.cgroups import sweep_orphans

            swept = sweep_orphans()
            if swept:
                log.info("removed %d cgroups left by a previous agent", len(swept))
        self.coordinator = Coordinator(self._factory, self.settings.coordinator, data)
        await self.coordinator.start()
        for op, fn in {
            "tasks.deploy": self.op_deploy,
            "tasks.list": self.op_list,
            "tasks.show": self.op_show,
            "tasks.remove": self.op_remove,
            "tasks.invoke": self.op_invoke,
            "tasks.call": self.op_call,
            "tasks.stats": self.op_stats,
        }.items():
            agent.router.add(op, fn)

    async def stop(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.close()
        if self._factory is not None:
            if hasattr(self._factory, "aclose"):
                await self._factory.aclose()
            else:
                self._factory.close()

    async def connected(self) -> None:
        return None

    def _coord(self) -> Coordinator:
        if self.coordinator is None:
            raise RequestError("the coordinator is not running on this host")
        return self.coordinator

    # -- operations (payloads are JSON objects from the controller) ----------------------

    async def op_deploy(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = str(p["account"]), str(p["name"])
        archive = base64.b64decode(p["archive_b64"])
        overrides = dict(p.get("overrides") or {})
        overrides["name"] = qualified(account, name)
        tv = await self._coord().deploy(archive, overrides=overrides)
        return task_json(tv)

    def _mine(self, account: str) -> list[TaskVersion]:
        return [tv for tv in self._coord().list() if split(tv.name)[0] == account]

    async def op_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        if p.get("account") is None:  # the admin sees every account's tasks
            return [task_json(tv) for tv in self._coord().list()]
        return [task_json(tv) for tv in self._mine(str(p["account"]))]

    async def op_show(self, p: dict[str, Any]) -> dict[str, Any]:
        return task_json(self._coord().show(qualified(str(p["account"]), str(p["name"]))))

    async def op_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        await self._coord().remove(qualified(str(p["account"]), str(p["name"])))
        return {"removed": p["name"]}

    async def op_invoke(self, p: dict[str, Any]) -> dict[str, Any]:
        name = qualified(str(p["account"]), str(p["name"]))
        coord = self._coord()
        if p.get("async"):
            call_id = await coord.invoke(
                name,
                p.get("event"),
                async_=True,
                idempotency_key=p.get("idempotency_key"),
                priority=p.get("priority"),
            )
            return {"id": call_id, "status": "queued"}
        rec = await coord.invoke(
            name,
            p.get("event"),
            idempotency_key=p.get("idempotency_key"),
            priority=p.get("priority"),
        )
        return call_json(rec)

    async def op_call(self, p: dict[str, Any]) -> dict[str, Any]:
        coord = self._coord()
        call_id = str(p["id"])
        if p.get("wait_s"):
            try:
                rec = await coord.wait_call(call_id, float(p["wait_s"]))
            except TimeoutError:  # not ended yet: its record as it stands
                rec = await coord.get_call(call_id)
        else:
            rec = await coord.get_call(call_id)
        account = p.get("account")
        if account is not None and split(rec.task)[0] != account:
            raise NotFound(f"call {call_id} not found")  # another account's call
        return call_json(rec)

    async def op_stats(self, _p: dict[str, Any]) -> dict[str, Any]:
        return self._coord().stats()
