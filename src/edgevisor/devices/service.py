"""DeviceService: broker + registry + routes + shadows + spool + timers on one agent.

I/O lives here; every decision is made by a pure core (``RouteTable.match``,
``shadows.apply_update``, ``TimerCore.due``) and this module performs the resulting actions.

Wiring the lead provides:

- ``call_task(task, event) -> result`` (async): the coordinator's task call. Route events
  are ``{"topic", "source", "payload"}``; timer events are described in :mod:`.timers`.
- ``send_to_controller(items)`` (async, optional): delivers a batch of
  :class:`~edgevisor.devices.spool.SpoolItem` (kinds ``message`` and ``shadow``) and raises
  :class:`~edgevisor.errors.PeerUnavailable` when the controller cannot take them. Without
  it everything stays spooled (offline).
- ``task_exists(name) -> bool`` (optional): routes and timers to unknown tasks are rejected.

Agent link. With the embedded broker the agent by default attaches in-process
(``agent_link = "inprocess"``: it is handed every message the broker accepted, after the
ACL check, and injects its own publishes into the broker), which halves the MQTT work of a
routed message; ``agent_link = "client"`` makes it connect over TCP as the privileged
client instead. With an external broker it is always a client.

TLS: with ``tls_port`` set the embedded broker also listens with TLS and requires client
certificates from the agent's devices CA (:mod:`.tls`); :meth:`DeviceService.issue_certificate`
makes one for a registered device (the key is returned, never kept). With an external broker
given as ``mqtts://`` the agent connects with TLS (``external_broker_cafile`` and an optional
client certificate).

Message flow: as a client the agent subscribes to every route filter and to
``edgevisor/shadow/+/update`` and ``.../get``. A received message is matched; task calls run
concurrently (at most ``max_concurrent_calls``; the reader waits when that many are in
flight, which back-pressures the broker); the result is published to the route's reply topic
(JSON; an error as ``{"error": {"code", "message"}}``) and then routed again as a message
with ``source_task`` set (topic: the reply topic or ``tasks/<task>/result``), so routes can
chain a task's output to a shadow, a topic or the controller. Loop guard: the agent ignores
messages on topics it publishes itself (reply and destination topics, the dead-letter topic,
shadow responses), since MQTT 3.1.1 does not say who published a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevisor.devices.broker import AGENT_USERNAME, EmbeddedBroker
from edgevisor.devices.client import ClientTLS, MqttClient, ReceivedMessage, with_credentials
from edgevisor.devices.config import DevicesSettings
from edgevisor.devices.db import open_db
from edgevisor.devices.registry import Device, DeviceRecord, DeviceRegistry
from edgevisor.devices.routes import (
    Action,
    CallTask,
    DeadLetter,
    Forward,
    Message,
    Publish,
    Route,
    RouteError,
    ShadowUpdate,
    ToTask,
    ToTopic,
    grants,
)
from edgevisor.devices.routestore import RouteStore
from edgevisor.devices.shadows import Shadow, ShadowStore, parse_update, reconcile
from edgevisor.devices.spool import Spool, SpoolItem
from edgevisor.devices.timers import Timer, TimerCore, TimerRunner, TimerStore
from edgevisor.devices.topics import SHADOW_ROOT, shadow_topic
from edgevisor.errors import (
    EdgevisorError,
    NotFound,
    PeerUnavailable,
    RequestError,
    Unauthorized,
    UnavailableError,
)

if TYPE_CHECKING:
    from edgevisor.devices.tls import DeviceCertificate, DevicesTLS

__all__ = ["DeviceService", "DevicesSettings"]

log = logging.getLogger(__name__)

CallTaskFn = Callable[[str, dict[str, Any]], Awaitable[Any]]
SendFn = Callable[[Sequence[SpoolItem]], Awaitable[None]]
_MAX_CHAIN = 4  # task result -> route -> task ... ; deeper chains are cut (and logged)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


class DeviceService:
    def __init__(
        self,
        settings: DevicesSettings,
        data_dir: Path,
        call_task: CallTaskFn,
        *,
        send_to_controller: SendFn | None = None,
        task_exists: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir or data_dir / "devices"
        self.call_task = call_task
        self.send_to_controller = send_to_controller
        self.task_exists = task_exists
        self.clock = clock
        self._conn = open_db(self.data_dir / "devices.db")
        self.registry = DeviceRegistry(self._conn)
        self._route_store = RouteStore(self._conn)
        self.routes = self._route_store.load()
        self.shadows = ShadowStore(self._conn)
        self._timer_store = TimerStore(self._conn)
        self.timer_core = TimerCore()
        self._timer_store.load(self.timer_core, clock())
        self.spool = Spool(
            self.data_dir / "spool.db",
            max_items=settings.spool_max_items,
            policy=settings.spool_drop_policy,
        )
        self.broker: EmbeddedBroker | None = None
        self.tls: DevicesTLS | None = None
        self.client: MqttClient | None = None
        self.timers = TimerRunner(self.timer_core, self._timer_store, call_task, clock=clock)
        self._sem = asyncio.Semaphore(settings.max_concurrent_calls)
        self._tasks: list[asyncio.Task[None]] = []
        self._calls: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        self._spool_kick = asyncio.Event()
        self.counters: dict[str, int] = {
            "messages_in": 0,
            "task_calls": 0,
            "task_errors": 0,
            "dead_letters": 0,
            "spool_rejected": 0,
            "shadow_updates": 0,
            "shadow_rejected": 0,
        }
        self._outputs: set[str] = set()
        self._chains: set[str] = set()
        self._refresh_grants()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.external_broker_url is None:
            if self.settings.tls_port is not None:
                try:
                    self.tls = await asyncio.to_thread(self._load_tls)
                except (OSError, ValueError) as exc:
                    raise UnavailableError(f"devices TLS material: {exc}") from exc
            self.broker = EmbeddedBroker(
                self.registry,
                host=self.settings.broker_host,
                port=self.settings.broker_port,
                tls=self.tls,
                tls_port=self.settings.tls_port,
            )
            await self.broker.start()
        link = (
            self._inprocess_loop()
            if self.broker is not None and self.settings.agent_link == "inprocess"
            else self._mqtt_loop()
        )
        self._tasks = [
            asyncio.create_task(link, name="devices-mqtt"),
            asyncio.create_task(self.timers.run(), name="devices-timers"),
            asyncio.create_task(self._spool_loop(), name="devices-spool"),
        ]
        try:
            async with asyncio.timeout(30.0):
                await self._connected.wait()
        except TimeoutError as exc:
            await self.stop()
            raise PeerUnavailable("the agent's MQTT client could not connect") from exc

    async def stop(self) -> None:
        for task in [*self._tasks, *self._calls]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._calls, return_exceptions=True)
        self._tasks = []
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
        self.spool.close()
        self._conn.close()

    @property
    def broker_url(self) -> str:
        if self.broker is not None:
            return self.broker.url
        return self.settings.external_broker_url or ""

    @property
    def broker_tls_url(self) -> str | None:
        """``mqtts://host:port`` of the embedded broker's TLS listener (None: no TLS)."""
        return self.broker.tls_url if self.broker is not None else None

    def _load_tls(self) -> DevicesTLS:
        from edgevisor.devices.tls import DevicesTLS

        s = self.settings
        directory = s.tls_dir or self.data_dir / "tls"
        return DevicesTLS.load_or_create(
            directory, names=(socket.gethostname(), *s.tls_names), ips=(s.broker_host,)
        )

    def _client_tls(self) -> ClientTLS | None:
        s = self.settings
        if self.broker is not None or not (s.external_broker_url or "").startswith("mqtts:"):
            return None
        return ClientTLS(s.external_broker_cafile, s.external_broker_certfile,
                         s.external_broker_keyfile)  # fmt: skip

    def _client_url(self) -> str:
        if self.broker is not None:
            return with_credentials(self.broker.url, AGENT_USERNAME, self.broker.agent_password)
        assert self.settings.external_broker_url is not None
        return self.settings.external_broker_url

    def _filters(self) -> set[str]:
        return self.routes.filters() | {
            shadow_topic("+", "update"),
            shadow_topic("+", "get"),
        }

    async def _inprocess_loop(self) -> None:
        assert self.broker is not None
        # The queue keeps arrival order and decouples the broker's session loops from the
        # routing; its bound caps what is buffered on our side (a full queue makes the
        # broker wait, which back-pressures the publishing device).
        inbox: asyncio.Queue[ReceivedMessage] = asyncio.Queue(maxsize=1024)

        async def tap(topic: str, payload: bytes) -> None:
            await inbox.put(ReceivedMessage(topic, payload))

        self.broker.attach(tap)
        self._connected.set()
        try:
            while True:
                await self._on_message(await inbox.get())
        finally:
            self.broker.attach(None)
            self._connected.clear()

    async def _mqtt_loop(self) -> None:
        while True:
            client = MqttClient(f"edgevisor-agent-{id(self):x}", tls=self._client_tls())
            try:
                await client.connect(self._client_url())
                await client.subscribe(sorted(self._filters()))
                self.client = client
                self._connected.set()
                async for msg in client.messages():
                    await self._on_message(msg)
            except Unauthorized:
                log.error("the MQTT broker refused the agent's credentials or subscriptions")
            except PeerUnavailable as exc:
                log.warning("agent MQTT connection: %s", exc)
            finally:
                self._connected.clear()
                self.client = None
                with contextlib.suppress(Exception):
                    await client.close()
            await asyncio.sleep(self.settings.reconnect_interval_s)

    # --- devices, routes, timers (API) ---------------------------------------------------

    def add_device(self, name: str, password: str | None = None) -> str:
        return self.registry.add(name, password)

    def remove_device(self, name: str) -> None:
        """Remove credentials (a certificate goes on the revocation list) and shadow, and
        close the device's open connections."""
        self.registry.remove(name)
        self.shadows.delete(name)
        if self.broker is not None:
            self.broker.disconnect(name)

    def issue_certificate(self, name: str, csr_pem: str | None = None) -> DeviceCertificate:
        """A new client certificate for a registered device (the previous one is revoked):
        over the key of ``csr_pem``, or over a new key that is returned, never kept. A CSR
        that cannot be used is refused before anything changes."""
        if self.tls is None:
            raise UnavailableError(
                "TLS is off on this host's broker (set devices.tls_port to turn it on)"
            )
        self.registry.get(name)
        cert = self.tls.issue_device(name, csr_pem)
        self.registry.set_cert_serial(name, cert.serial)
        if self.broker is not None:
            self.broker.disconnect(name)  # whoever held the old certificate
        return cert

    def export_device(self, name: str) -> tuple[DeviceRecord, Shadow]:
        """Credentials and shadow of a device, for :meth:`restore_device` (rollback)."""
        return self.registry.export(name), self.shadows.get(name)

    def restore_device(self, rec: DeviceRecord, shadow: Shadow) -> None:
        self.registry.restore(rec)
        if shadow.version > 0:
            self.shadows.put(shadow, previous_version=self.shadows.get(rec.name).version)

    def devices(self) -> list[Device]:
        return self.registry.devices()

    def _refresh_grants(self) -> None:
        """Recompute what depends on the route set: device grants, the agent's outputs."""
        routes = list(self.routes.routes.values())
        outputs: set[str] = set()
        for r in routes:
            d = r.destination
            if isinstance(d, ToTask) and d.reply_topic is not None:
                outputs.add(d.reply_topic)
            elif isinstance(d, ToTopic):
                outputs.add(d.topic)
        self._outputs = outputs
        # Most route sets have no task-sourced route; then a result needs no second match.
        self._chains = {r.source_task for r in routes if r.source_task is not None}
        names = {r.source_device for r in routes if r.source_device}
        self.registry.set_grants({n: grants(routes, n) for n in names})

    async def add_route(self, route: Route) -> None:
        """Validate (rejecting routes to missing tasks), persist, subscribe."""
        if route.name in self.routes.routes:
            raise RequestError(f"route {route.name!r} already exists")
        try:
            self.routes.add(route, self.task_exists)
        except RouteError as exc:
            raise RequestError(str(exc)) from exc
        self._route_store.save(route)
        self._refresh_grants()
        if self.client is not None and route.source_task is None:
            await self.client.subscribe([route.topic_filter])

    async def remove_route(self, name: str) -> None:
        route = self.routes.routes.get(name)
        if route is None:
            raise NotFound(f"no route named {name!r}")
        self.routes.remove(name)
        self._route_store.delete(name)
        self._refresh_grants()
        if self.client is not None and route.topic_filter not in self._filters():
            await self.client.unsubscribe([route.topic_filter])

    def add_timer(self, timer: Timer) -> None:
        if self.task_exists is not None and not self.task_exists(timer.task):
            raise RequestError(f"timer {timer.name}: no task named {timer.task!r}")
        self.timer_core.add(timer, self.clock())
        self._timer_store.save(timer, self.timer_core.next_run[timer.name])
        self.timers.poke()

    def remove_timer(self, name: str) -> None:
        self.timer_core.remove(name)
        self._timer_store.delete(name)
        self.timers.poke()

    # --- shadows -------------------------------------------------------------------------

    def get_shadow(self, device: str) -> Shadow:
        self.registry.get(device)
        return self.shadows.get(device)

    async def update_shadow(
        self,
        device: str,
        *,
        desired: dict[str, Any] | None = None,
        reported: dict[str, Any] | None = None,
        version: int | None = None,
    ) -> Shadow:
        """Apply an update (raises ShadowConflict on a stale version), publish, spool."""
        self.registry.get(device)
        shadow = self.shadows.update(
            device, desired=desired, reported=reported, expected_version=version, now=self.clock()
        )
        self.counters["shadow_updates"] += 1
        await self._after_shadow_change(shadow)
        return shadow

    async def apply_controller_shadow(self, doc: dict[str, Any]) -> Shadow:
        """Merge the controller's copy by the rule in :mod:`.shadows`; publishes the delta."""
        remote = Shadow.from_json(doc)
        local = self.shadows.get(remote.device)
        merged = reconcile(local, remote)
        if merged != local:
            self.shadows.put(merged, previous_version=local.version)
            await self._after_shadow_change(merged, to_controller=False)
        return merged

    async def _after_shadow_change(self, shadow: Shadow, *, to_controller: bool = True) -> None:
        delta = shadow.delta
        if delta:
            await self._publish(
                shadow_topic(shadow.device, "delta"),
                _dumps({"state": delta, "version": shadow.version}),
            )
        if to_controller:
            self._spool("shadow", shadow.to_json())

    async def _on_shadow_message(self, device: str, op: str, payload: bytes) -> None:
        if not self.registry.exists(device):
            return  # only reachable through an external broker; nobody to answer
        if op == "get":
            doc = self.shadows.get(device).to_json()
            await self._publish(shadow_topic(device, "get/accepted"), _dumps(doc))
            return
        try:
            try:
                body = json.loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(f"shadow update is not JSON: {exc}") from exc
            desired, reported, version = parse_update(body)
            shadow = await self.update_shadow(
                device, desired=desired, reported=reported, version=version
            )
        except EdgevisorError as exc:
            self.counters["shadow_rejected"] += 1
            reply = {"code": exc.code, "message": exc.message, **exc.details}
            if "version" not in reply:
                reply["version"] = self.shadows.get(device).version
            await self._publish(shadow_topic(device, "update/rejected"), _dumps(reply))
            return
        await self._publish(shadow_topic(device, "update/accepted"), _dumps(shadow.to_json()))

    # --- message path --------------------------------------------------------------------

    def _own_output(self, topic: str) -> bool:
        return topic == self.settings.dead_letter_topic or topic in self._outputs

    async def _on_message(self, msg: ReceivedMessage) -> None:
        self.counters["messages_in"] += 1
        if msg.topic.startswith(SHADOW_ROOT + "/"):
            parts = msg.topic.split("/")
            if len(parts) == 4 and parts[3] in ("update", "get"):
                await self._on_shadow_message(parts[2], parts[3], msg.payload)
            return
        if self._own_output(msg.topic):
            return
        await self._perform(self.routes.match(Message(msg.topic, msg.payload)), depth=0)

    async def _perform(self, actions: list[Action], depth: int) -> None:
        for action in actions:
            if isinstance(action, CallTask):
                # Chained calls (depth > 0) take no slot of their own: waiting for one
                # while the parent holds one could deadlock when all slots chain.
                if depth == 0:
                    await self._sem.acquire()
                task = asyncio.create_task(self._call(action, depth))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
            elif isinstance(action, Publish):
                await self._publish(action.topic, action.payload)
            elif isinstance(action, ShadowUpdate):
                try:
                    if action.section == "reported":
                        await self.update_shadow(action.device, reported=action.state)
                    else:
                        await self.update_shadow(action.device, desired=action.state)
                except EdgevisorError as exc:
                    log.warning("route %s: shadow update failed: %s", action.route, exc)
            elif isinstance(action, Forward):
                self._spool("message", action.record)
            elif isinstance(action, DeadLetter):
                self.counters["dead_letters"] += 1
                await self._publish(self.settings.dead_letter_topic, action.to_payload())

    async def _call(self, action: CallTask, depth: int) -> None:
        try:
            self.counters["task_calls"] += 1
            ok = True
            try:
                result = await self.call_task(action.task, action.event)
            except EdgevisorError as exc:
                ok, result = False, exc.to_payload()
            except Exception as exc:
                ok, result = False, {"error": {"code": "internal", "message": repr(exc)}}
            if not ok:
                self.counters["task_errors"] += 1
            payload = _dumps(result)
            if action.reply_topic is not None:
                await self._publish(action.reply_topic, payload)
            if ok and action.task in self._chains:
                if depth >= _MAX_CHAIN:
                    log.warning("route %s: chain deeper than %d cut", action.route, _MAX_CHAIN)
                    return
                topic = action.reply_topic or f"tasks/{action.task}/result"
                follow = self.routes.match(Message(topic, payload, source_task=action.task))
                await self._perform(follow, depth + 1)
        except PeerUnavailable as exc:
            log.warning("route %s: reply not published: %s", action.route, exc)
        finally:
            if depth == 0:
                self._sem.release()

    async def _publish(self, topic: str, payload: bytes) -> None:
        if self.broker is not None and self.settings.agent_link == "inprocess":
            await self.broker.publish(topic, payload, self.settings.reply_qos)
            return
        client = self.client
        if client is None:
            log.warning("MQTT not connected; message to %s dropped", topic)
            return
        await client.publish(topic, payload, qos=self.settings.reply_qos)

    # --- spool ---------------------------------------------------------------------------

    def _spool(self, kind: str, body: dict[str, Any]) -> None:
        if not self.spool.put(kind, body):
            self.counters["spool_rejected"] += 1
        self._spool_kick.set()

    async def flush_spool(self) -> int:
        """Deliver the spool now; returns how many went out (0 without a controller link)."""
        if self.send_to_controller is None:
            return 0
        return await self.spool.drain(self.send_to_controller)

    async def _spool_loop(self) -> None:
        while True:
            self._spool_kick.clear()
            if self.send_to_controller is not None and len(self.spool):
                try:
                    await self.flush_spool()
                except PeerUnavailable as exc:
                    log.info("controller unreachable, %d spooled: %s", len(self.spool), exc)
                    await asyncio.sleep(self.settings.spool_retry_interval_s)
                    continue
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
            # arrives together with the event, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.spool_retry_interval_s):
                    await self._spool_kick.wait()

    # --- reporting -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "broker": self.broker.stats.to_json() if self.broker is not None else None,
            "spool": self.spool.stats(),
            "timers": {
                "fired": self.timers.fired,
                "failed": self.timers.failed,
                "skipped": self.timer_core.skipped,
            },
        }
