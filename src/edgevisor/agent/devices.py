"""Coordinated devices as an agent capability: the host's :class:`DeviceService`, wired to
the coordinator and the controller, plus the agent half of deployments.

Accounts and names. One broker, one route table and one shadow store serve every account
on the host, so everything an account owns is *qualified* on the agent the way tasks are
(:func:`edgevisor.agent.tasks.qualified`): device ``sensor1`` of account ``acme`` is the
device ``acme.sensor1``. That name is also its MQTT username, and its topics keep the
device-scoped prefix of :mod:`edgevisor.devices.topics`: ``devices/acme.sensor1/#`` and
``edgevisor/shadow/acme.sensor1/...``. Routes (``acme.r1``) and timers (``acme.t1``) are
qualified too, and may only name the account's own devices and tasks. Their topics must lie
in the account's part of the topic space, so one account never sees another's traffic:

- ``devices/<account>.<device>/...`` (a literal device of the account),
- ``tasks/<account>.<task>/...`` (a task's result, for chained routes),
- ``<account>/...`` (free-form topics of the account).

Controller link. ``send_to_controller`` posts spooled items to
``POST /v1/hosts/<host>/devices/intake`` with the host credential; any failure is reported
to the spool as :class:`PeerUnavailable`, so the items stay on disk and go out in order
later. ``connected()`` (controller back) flushes the spool, pulls the controller's copies of
shadows changed while the host was away, and checks for a new deployment.

Deployments: the agent half is :mod:`edgevisor.agent.devices_deploy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from edgevisor.agent.devices_deploy import Deployer
from edgevisor.agent.tasks import qualified, split
from edgevisor.devices.registry import valid_device_name
from edgevisor.devices.routes import Route, RouteError, ToShadow, ToTask
from edgevisor.devices.service import DeviceService
from edgevisor.devices.shadows import Shadow
from edgevisor.devices.spool import SpoolItem
from edgevisor.devices.timers import Timer
from edgevisor.errors import (
    Conflict,
    EdgevisorError,
    NotFound,
    PeerUnavailable,
    RequestError,
    UnavailableError,
)
from edgevisor.settings import Settings
from edgevisor.tasks.service import Coordinator

if TYPE_CHECKING:
    from edgevisor.agent.daemon import Agent

__all__ = [
    "DevicesCapability",
    "check_topic",
    "qualify_route",
    "unqualify_route",
]

log = logging.getLogger(__name__)
OpFn = Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]


class TaskCallFailed(EdgevisorError):
    """A routed or timed task call did not succeed; ``details`` holds the call's error."""

    code = "task_failed"


# --- names -------------------------------------------------------------------------------


def check_topic(account: str, topic: str, what: str) -> None:
    """Reject a topic (or filter) outside the account's part of the topic space."""
    parts = topic.split("/")
    first = parts[0]
    second = parts[1] if len(parts) > 1 else ""
    if first == account and len(parts) > 1:
        return
    own = second.startswith(f"{account}.") and len(second) > len(account) + 1
    if first in ("devices", "tasks") and own and not {"+", "#"} & set(second):
        return
    raise RequestError(
        f"{what} {topic!r} is outside account {account!r}: use devices/{account}.<device>/..., "
        f"tasks/{account}.<task>/... or {account}/..."
    )


def _name(account: str, name: Any, what: str) -> str:
    """``<account>.<name>`` for a non-empty name that is a valid device/route/timer name."""
    if not isinstance(name, str) or not name:
        raise RequestError(f"{what} name must be a non-empty string")
    return valid_device_name(qualified(account, name))


def qualify_route(account: str, obj: dict[str, Any]) -> Route:
    """An account's route (its own names) as the agent's route (qualified names)."""
    _name(account, obj.get("name"), "route")
    try:
        route = Route.from_json({**obj, "name": qualified(account, str(obj.get("name", "")))})
    except RouteError as exc:
        raise RequestError(str(exc)) from exc
    d = route.destination
    dest: Any = d
    if isinstance(d, ToTask):
        if d.reply_topic is not None:
            check_topic(account, d.reply_topic, "reply topic")
        dest = ToTask(qualified(account, d.task), d.reply_topic)
    elif isinstance(d, ToShadow):
        dest = ToShadow(qualified(account, d.device), d.section)
    elif hasattr(d, "topic"):
        check_topic(account, d.topic, "destination topic")
    check_topic(account, route.topic_filter, "topic filter")
    return Route(
        name=route.name,
        topic_filter=route.topic_filter,
        destination=dest,
        source_device=qualified(account, route.source_device) if route.source_device else None,
        source_task=qualified(account, route.source_task) if route.source_task else None,
        where=route.where,
    )


def _bare(name: str | None) -> str | None:
    return split(name)[1] if name else name


def unqualify_route(route: Route) -> dict[str, Any]:
    out = route.to_json()
    out["name"] = _bare(route.name)
    out["source_device"] = _bare(route.source_device)
    out["source_task"] = _bare(route.source_task)
    d = out["destination"]
    if d["kind"] == "task":
        d["task"] = _bare(d["task"])
    elif d["kind"] == "shadow":
        d["device"] = _bare(d["device"])
    return out


def _timer_json(timer: Timer) -> dict[str, Any]:
    out = timer.to_json()
    out["name"] = _bare(timer.name)
    out["task"] = _bare(timer.task)
    return out


def _shadow_json(shadow: Shadow) -> dict[str, Any]:
    out = shadow.to_json()
    out["device"] = _bare(shadow.device)
    return out


def _mine(account: str | None, name: str) -> bool:
    return account is None or split(name)[0] == account


def _on_loop(loop: asyncio.AbstractEventLoop, fn: OpFn) -> OpFn:
    """Run an operation on the agent's loop, also when the caller runs another loop.

    The controller of ``edgevisor up`` and the test fleets call the agent's router
    in-process; an operation touches the broker and asyncio tasks of the agent's loop, which
    must not be used from another loop or thread.
    """

    async def op(payload: dict[str, Any]) -> Any:
        if asyncio.get_running_loop() is loop:
            return await fn(payload)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(payload), loop))

    return op


# --- the capability ----------------------------------------------------------------------


class DevicesCapability:
    """Runs the host's device service; answers ``devices.*``, ``routes.*``, ``timers.*``,
    ``shadows.*`` and ``deployment.*``."""

    name = "devices"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service: DeviceService | None = None
        self.deployer: Deployer | None = None
        self._agent: Agent | None = None
        self._down_reason = "the device service is not running on this host"
        # One spool batch in flight at a time: connected() and the spool loop both drain,
        # and two concurrent posts of the same items would race in the controller.
        self._send_lock = asyncio.Lock()

    async def start(self, agent: Agent) -> None:
        self._agent = agent
        service = DeviceService(
            self.settings.devices,
            agent.dir,
            self._call_task,
            send_to_controller=self._send,
            task_exists=self._task_exists,
        )
        try:
            await service.start()
        except UnavailableError as exc:
            # Tasks and the other capabilities must still run (e.g. port 1883 is taken);
            # the device operations answer "unavailable" with the reason.
            log.error("devices capability not running: %s", exc)
            self._down_reason = f"the device service is not running: {exc.message}"
            with contextlib.suppress(Exception):
                await service.stop()
        else:
            self.service = service
        self.deployer = Deployer(agent, self)
        if self.service is not None:
            self.deployer.start()
        ops = {
            "devices.add": self.op_device_add,
            "devices.remove": self.op_device_remove,
            "devices.certificate": self.op_device_certificate,
            "devices.purge": self.op_purge,
            "devices.list": self.op_device_list,
            "devices.stats": self.op_stats,
            "routes.add": self.op_route_add,
            "routes.remove": self.op_route_remove,
            "routes.list": self.op_route_list,
            "timers.add": self.op_timer_add,
            "timers.remove": self.op_timer_remove,
            "timers.list": self.op_timer_list,
            "shadows.get": self.op_shadow_get,
            "shadows.update": self.op_shadow_update,
            "shadows.apply": self.op_shadow_apply,
            "deployment.poke": self.deployer.op_poke,
            "deployment.status": self.deployer.op_status,
            "deployment.cancel": self.deployer.op_cancel,
        }
        loop = asyncio.get_running_loop()
        for op, fn in ops.items():
            agent.router.add(op, _on_loop(loop, fn))

    async def stop(self) -> None:
        if self.deployer is not None:
            await self.deployer.stop()
        if self.service is not None:
            await self.service.stop()
            self.service = None

    async def connected(self) -> None:
        # Before anything else: objects of accounts deleted while this host was away must
        # not be synced, re-applied or re-reported.
        await self._pending_purges()
        if self.service is None:
            return
        svc = self.service
        with contextlib.suppress(PeerUnavailable):
            await svc.flush_spool()
        await self._pull_shadows()
        if self.deployer is not None:
            self.deployer.poke()

    # -- wiring ------------------------------------------------------------------------

    def _svc(self) -> DeviceService:
        if self.service is None:
            raise UnavailableError(self._down_reason)
        return self.service

    def coordinator(self) -> Coordinator:
        assert self._agent is not None
        coord: Coordinator | None = self._agent.capability("tasks").coordinator
        if coord is None:
            raise UnavailableError("the coordinator is not running on this host")
        return coord

    async def _call_task(self, task: str, event: dict[str, Any]) -> Any:
        rec = await self.coordinator().invoke(task, event)
        if rec.status != "succeeded":
            err = rec.error or {}
            raise TaskCallFailed(
                f"task {task} {rec.status}: {err.get('message', '')}".strip(),
                details={"status": str(rec.status), "type": err.get("type")},
            )
        return rec.result

    def _task_exists(self, name: str) -> bool:
        try:
            self.coordinator().show(name)
        except (NotFound, UnavailableError):
            return False
        return True

    async def _send(self, items: Sequence[SpoolItem]) -> None:
        assert self._agent is not None
        body = {
            "items": [
                {"seq": i.seq, "kind": i.kind, "body": i.body, "created_at": i.created_at}
                for i in items
            ]
        }
        try:
            async with self._send_lock:
                await self._agent.request(
                    "POST", f"/v1/hosts/{self._agent.host}/devices/intake", body
                )
        except PeerUnavailable:
            raise
        except EdgevisorError as exc:  # anything else keeps the items too (spool contract)
            raise PeerUnavailable(f"controller did not take the spool batch: {exc}") from exc

    async def _pull_shadows(self) -> None:
        """Apply the controller's copies changed while this host was away."""
        assert self._agent is not None
        try:
            docs = await self._agent.request("GET", f"/v1/hosts/{self._agent.host}/shadows")
        except EdgevisorError as exc:
            log.info("could not pull shadows from the controller: %s", exc)
            return
        for doc in docs or []:
            try:
                await self._svc().apply_controller_shadow(doc)
            except EdgevisorError as exc:
                log.warning("shadow %s from the controller not applied: %s", doc, exc)

    # -- devices -----------------------------------------------------------------------

    async def op_device_add(self, p: dict[str, Any]) -> dict[str, Any]:
        svc = self._svc()
        account, name = str(p["account"]), str(p["name"])
        full = _name(account, name, "device")
        # A client certificate when asked for, and by default when the broker has TLS.
        want_cert = p.get("cert")
        if want_cert is None:
            want_cert = svc.tls is not None
        if want_cert and svc.tls is None:
            raise RequestError(
                "this host's broker has no TLS listener (devices.tls_port); no certificate"
            )
        password = svc.add_device(full, p.get("password") or None)
        tls = None
        if want_cert:
            try:
                cert = svc.issue_certificate(full)
            except BaseException:
                svc.remove_device(full)  # all or nothing
                raise
            tls = {**cert.to_json(), "url": svc.broker_tls_url}
        return {
            "name": name,
            "account": account,
            "username": full,
            "password": password,
            "broker_url": svc.broker_url,
            "topic_root": f"devices/{full}",
            "tls": tls,
        }

    async def op_device_certificate(self, p: dict[str, Any]) -> dict[str, Any]:
        """A new client certificate for a device; the one it had is revoked."""
        svc = self._svc()
        full = qualified(str(p["account"]), str(p["name"]))
        csr = p.get("csr_pem")
        cert = svc.issue_certificate(full, None if csr is None else str(csr))
        return {"name": p["name"], "username": full, **cert.to_json(),
                "url": svc.broker_tls_url}  # fmt: skip

    async def op_device_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        self._svc().remove_device(qualified(str(p["account"]), str(p["name"])))
        return {"removed": p["name"]}

    async def op_device_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        account = p.get("account")
        svc = self._svc()
        return [
            {
                "name": split(d.name)[1],
                "account": split(d.name)[0],
                "username": d.name,
                "created_at": d.created_at,
                "broker_url": svc.broker_url,
            }
            for d in svc.devices()
            if _mine(account, d.name)
        ]

    async def op_purge(self, p: dict[str, Any]) -> dict[str, Any]:
        """Remove everything of a deleted account on this host: its deployment state (a
        deployment in flight is cancelled first), timers, routes, devices (credentials
        revoked, connections closed), shadows, and its tasks. Idempotent."""
        account = str(p["account"])
        if not account:
            raise RequestError("account must be named")
        removed = {"timers": 0, "routes": 0, "devices": 0, "shadows": 0, "tasks": 0}
        if self.deployer is not None:
            await self.deployer.forget(account)
        svc = self.service
        if svc is not None:
            for name in [n for n in svc.timer_core.timers if _mine(account, n)]:
                svc.remove_timer(name)
                removed["timers"] += 1
            for name in [n for n in svc.routes.routes if _mine(account, n)]:
                await svc.remove_route(name)
                removed["routes"] += 1
            for dev in [d.name for d in svc.devices() if _mine(account, d.name)]:
                svc.remove_device(dev)
                removed["devices"] += 1
            for dev in [d for d in svc.shadows.devices() if _mine(account, d)]:
                svc.shadows.delete(dev)  # shadows of devices already gone
                removed["shadows"] += 1
        with contextlib.suppress(UnavailableError):
            coord = self.coordinator()
            for tv in coord.list():
                if _mine(account, tv.name):
                    with contextlib.suppress(NotFound):
                        await coord.remove(tv.name)
                    removed["tasks"] += 1
        log.info("account %s purged from this host: %s", account, removed)
        return {"account": account, "removed": removed}

    async def _pending_purges(self) -> None:
        """Purges the controller recorded while this host was unreachable."""
        assert self._agent is not None
        host = self._agent.host
        try:
            pending = await self._agent.request("GET", f"/v1/hosts/{host}/purges")
        except EdgevisorError as exc:
            log.info("could not fetch pending account purges: %s", exc)
            return
        for item in pending or []:
            try:
                await self.op_purge({"account": item["account"]})
                await self._agent.request("POST", f"/v1/hosts/{host}/purges/{item['id']}/done")
            except EdgevisorError as exc:
                log.warning("account purge %s not finished: %s", item, exc)

    async def op_stats(self, _p: dict[str, Any]) -> dict[str, Any]:
        return self._svc().stats()

    # -- routes and timers -------------------------------------------------------------

    async def op_route_add(self, p: dict[str, Any]) -> dict[str, Any]:
        account = str(p["account"])
        route = qualify_route(account, dict(p["route"]))
        if route.source_device and not self._svc().registry.exists(route.source_device):
            raise RequestError(f"route source: no device named {_bare(route.source_device)!r}")
        d = route.destination
        if isinstance(d, ToTask) and not self._task_exists(d.task):
            raise RequestError(f"destination.task: no task named {_bare(d.task)!r}")
        if isinstance(d, ToShadow) and not self._svc().registry.exists(d.device):
            raise RequestError(f"route destination: no device named {_bare(d.device)!r}")
        await self._svc().add_route(route)
        return unqualify_route(route)

    async def op_route_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        await self._svc().remove_route(qualified(str(p["account"]), str(p["name"])))
        return {"removed": p["name"]}

    async def op_route_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        account = p.get("account")
        routes = self._svc().routes.routes
        return [unqualify_route(r) for n, r in sorted(routes.items()) if _mine(account, n)]

    def qualify_route(self, account: str, obj: dict[str, Any]) -> Route:
        return qualify_route(account, obj)

    def qualify_timer(self, account: str, obj: dict[str, Any]) -> Timer:
        _name(account, obj.get("name"), "timer")
        try:
            timer = Timer.from_json(
                {
                    **obj,
                    "name": qualified(account, str(obj.get("name", ""))),
                    "task": qualified(account, str(obj.get("task", ""))),
                }
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise RequestError(f"malformed timer: {exc}") from exc
        return timer

    async def op_timer_add(self, p: dict[str, Any]) -> dict[str, Any]:
        timer = self.qualify_timer(str(p["account"]), dict(p["timer"]))
        svc = self._svc()
        if timer.name in svc.timer_core.timers:
            raise Conflict(f"timer {_bare(timer.name)!r} already exists")
        svc.add_timer(timer)
        return {**_timer_json(timer), "next_run": svc.timer_core.next_run.get(timer.name)}

    async def op_timer_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        self._svc().remove_timer(qualified(str(p["account"]), str(p["name"])))
        return {"removed": p["name"]}

    async def op_timer_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        account = p.get("account")
        core = self._svc().timer_core
        return [
            {**_timer_json(t), "next_run": core.next_run.get(n)}
            for n, t in sorted(core.timers.items())
            if _mine(account, n)
        ]

    # -- shadows -----------------------------------------------------------------------

    async def op_shadow_get(self, p: dict[str, Any]) -> dict[str, Any]:
        full = qualified(str(p["account"]), str(p["device"]))
        return _shadow_json(self._svc().get_shadow(full))

    async def op_shadow_update(self, p: dict[str, Any]) -> dict[str, Any]:
        full = qualified(str(p["account"]), str(p["device"]))
        version = p.get("version")
        try:
            shadow = await self._svc().update_shadow(
                full,
                desired=p.get("desired"),
                reported=p.get("reported"),
                version=int(version) if version is not None else None,
            )
        except Conflict as exc:
            # A plain Conflict: it survives the trip to the controller as the same class.
            raise Conflict(exc.message, details=exc.details) from exc
        return _shadow_json(shadow)

    async def op_shadow_apply(self, p: dict[str, Any]) -> dict[str, Any]:
        """The controller's copy of a shadow (device name qualified by the account)."""
        doc = dict(p["doc"])
        doc["device"] = qualified(str(p["account"]), str(doc["device"]))
        self._svc().registry.get(doc["device"])
        return _shadow_json(await self._svc().apply_controller_shadow(doc))
