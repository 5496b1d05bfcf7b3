"""amqtt internals the embedded broker (:mod:`edgevisor.devices.broker`) overrides.

Per-message cost. amqtt runs every plugin hook as its own asyncio task (a task plus a
``gather`` for each ACL check, on publish and again for every delivery; a task for each
broadcast event). At thousands of messages a second that bookkeeping is a large part of the
broker's CPU, so :class:`_FastBroker` answers the ACL check synchronously from the policy and
hands accepted publishes to the tap inline (which also back-pressures a device whose
messages the agent cannot take fast enough, instead of piling up tasks); its broadcast loop
takes messages without a task and an ``asyncio.wait`` each. The decisions are
the same :class:`BrokerPolicy` ones; the plugins stay registered and are what runs on an
amqtt whose internals differ (see :data:`_FAST_PATH`).

A client's end loses nothing (issue 4). amqtt stopped a client's message loop at DISCONNECT
(or a lost connection) with PUBLISHes already read, QoS 1 ones already acknowledged, still
queued, and its reader cancelled the handling of packets read in the same chunk as EOF: a
device that published a burst and disconnected at once lost its last messages whenever the
agent was busy. :meth:`_FastBroker._client_message_loop` handles every PUBLISH read before
the end, in order, then ends the session as amqtt does (a clean DISCONNECT discards the
will); :class:`_Handler` lets packets read before EOF be handled. The same handler reads
without amqtt's per-packet read timeout (a task and a timer per packet, and a no-op when it
fired) and enforces keep-alive with one timer per connection instead.

All of it depends on amqtt 0.12's private methods; :data:`_FAST_PATH` checks they are there
with the expected signatures, and without them the broker runs amqtt as is
(:class:`_PlainBroker`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet as mqtt_packet
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

if TYPE_CHECKING:
    import ssl

    from edgevisor.devices.broker import BrokerPolicy
    from edgevisor.devices.tls import DevicesTLS

log = logging.getLogger(__name__)


def _has_method(name: str, params: list[str]) -> bool:
    fn = getattr(Broker, name, None)
    return callable(fn) and list(inspect.signature(fn).parameters)[: len(params)] == params


_FAST_PATH = (
    _has_method("_topic_filtering", ["self", "session", "topic", "action"])
    and _has_method("_broadcast_message", ["self", "session", "topic", "data", "force_qos"])
    and _has_method("_stop_handler", ["self", "handler"])
    and _has_method("_run_broadcast", ["self", "running_tasks"])
    and _has_method("_matches", ["self", "topic", "a_filter"])
    and _has_method("_get_handler", ["self", "session"])
    and _has_method("_retain_broadcast_message", ["self", "broadcast", "qos", "target_session"])
    and _has_method("_client_message_loop", ["self", "client_session", "handler"])
    and _has_method("_handle_message_delivery", ["self", "client_session", "handler"])
    and _has_method("_handle_disconnect", ["self", "client_session", "handler"])
    and _has_method("_handle_subscription", ["self", "client_session", "handler"])
    and _has_method("_handle_unsubscription", ["self", "client_session", "handler"])
    and _has_method("_handle_client_session", ["self", "reader", "writer", "client_session"])
    and callable(getattr(BrokerProtocolHandler, "_reader_loop", None))
    and callable(getattr(BrokerProtocolHandler, "_init_session", None))
    and hasattr(mqtt_packet.MQTTFixedHeader, "from_stream")
)

# Above this many unsent bytes for a subscriber, deliveries take amqtt's path again, whose
# drain() back-pressures (the direct write never waits).
_DIRECT_WRITE_MAX_BUFFER = 64 * 1024


def _publish_frame(topic: str, data: bytes | bytearray) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet, QoS 0, no DUP, no RETAIN (spec 3.3)."""
    name = topic.encode()
    size = 2 + len(name) + len(data)
    head = bytearray(b"\x30")
    while True:  # remaining length: 7 bits a byte, low group first (spec 2.2.3)
        byte, size = size & 0x7F, size >> 7
        head.append(byte | 0x80 if size else byte)
        if not size:
            break
    head += len(name).to_bytes(2, "big")
    return bytes(head + name + data)


# Packet type -> the handler method amqtt runs for it as a task (CONNECT is run inline).
_PACKET_HANDLERS: dict[int, str] = {
    mqtt_packet.CONNACK: "handle_connack",
    mqtt_packet.SUBSCRIBE: "handle_subscribe",
    mqtt_packet.UNSUBSCRIBE: "handle_unsubscribe",
    mqtt_packet.SUBACK: "handle_suback",
    mqtt_packet.UNSUBACK: "handle_unsuback",
    mqtt_packet.PUBACK: "handle_puback",
    mqtt_packet.PUBREC: "handle_pubrec",
    mqtt_packet.PUBREL: "handle_pubrel",
    mqtt_packet.PUBCOMP: "handle_pubcomp",
    mqtt_packet.PINGREQ: "handle_pingreq",
    mqtt_packet.PINGRESP: "handle_pingresp",
    mqtt_packet.PUBLISH: "handle_publish",
    mqtt_packet.DISCONNECT: "handle_disconnect",
}

# How long the end of a connection waits for handling of packets read before it (see
# _Handler._settle): only a write to a peer that stopped reading takes that long.
_SETTLE_TIMEOUT_S = 5.0


class _Handler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side connection handler with a cheaper reader and real keep-alive.

    amqtt reads each packet under ``asyncio.wait_for(..., keep_alive)``: a task and a timer
    per packet, and when it fires the broker's handler does nothing (no disconnect). Here
    the reader awaits packets directly and notes when the last one came; one timer per
    connection checks that clock and closes a client silent for 1.5x its keep-alive (MQTT
    3.1.1, 3.1.2.10), which ends the session as a lost connection (the will is published).
    amqtt's write-side keep-alive timer, re-armed on every send, also only calls a no-op
    here, so it is not armed at all.

    Packets are handled as amqtt does (a task each, in arrival order), except that a QoS 0
    PUBLISH is handled inline when no earlier packet's task is still pending: it only
    queues the message, and order is kept because everything before it is done.
    The broker swaps a fresh handler's class to this one (:meth:`_FastBroker.
    _handle_client_session`); amqtt creates handlers itself.
    """

    _last_rx: float
    _idle_timer: asyncio.TimerHandle | None

    def _init_session(self, session: Session) -> None:
        super()._init_session(session)
        self.keepalive_timeout = None  # the write-side timer: see the class docstring
        self._idle_timer = None

    def _check_idle(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_rx
        if idle < limit:
            self._idle_timer = loop.call_later(limit - idle, self._check_idle, limit)
            return
        self._idle_timer = None
        session = self.session
        log.info(
            "mqtt client %s silent for %.1f s (keep-alive %s s): closing",
            getattr(session, "client_id", "?"), idle, getattr(session, "keep_alive", "?"),
        )  # fmt: skip
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()  # the reader ends as on a lost connection

    async def stop(self) -> None:
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
        await super().stop()

    async def _settle(self, running: deque[asyncio.Task[None]]) -> None:
        """Let the packets read before the end be handled, then cancel what is left.

        A burst, DISCONNECT and EOF often arrive in one read: the reader reaches EOF before
        any of their tasks ran. amqtt cancelled them here, losing acknowledged PUBLISHes
        and turning a clean DISCONNECT into a lost connection (will published). Only a QoS 2
        PUBLISH still waiting for its PUBREL cannot finish now (and is not delivered: the
        client keeps it, MQTT 4.3.3).
        """
        if not running:
            return
        await asyncio.sleep(0)  # every task made so far runs its first step (FIFO)
        for waiter in list(self._pubrel_waiters.values()):
            if not waiter.done():
                waiter.cancel()
        _, pending = await asyncio.wait(running, timeout=_SETTLE_TIMEOUT_S)
        for task in pending:  # e.g. a PUBACK write to a peer that stopped reading
            task.cancel()
        running.clear()

    async def _reader_loop(self) -> None:
        session, reader, ready = self.session, self.reader, self._reader_ready
        if session is None or reader is None or ready is None:
            raise RuntimeError("mqtt handler started without a session")
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        if session.keep_alive > 0:
            limit = 1.5 * session.keep_alive
            self._idle_timer = loop.call_later(limit, self._check_idle, limit)
        running: deque[asyncio.Task[None]] = deque()
        ready.set()
        while True:
            try:
                while running and running[0].done():
                    running.popleft()
                header = await mqtt_packet.MQTTFixedHeader.from_stream(reader)
                if header is None:
                    break  # EOF
                self._last_rx = loop.time()
                kind = header.packet_type
                if kind == mqtt_packet.CONNECT:
                    packet = await packet_class(header).from_stream(reader, fixed_header=header)
                    await self.plugins_manager.fire_event(
                        MQTTEvents.PACKET_RECEIVED, packet=packet, session=session
                    )
                    await self.handle_connect(packet)
                    continue
                name = _PACKET_HANDLERS.get(kind)
                if name is None:  # reserved types 0 and 15 (spec 2.2.1): close
                    log.warning("mqtt client %s sent packet type %d", session.client_id, kind)
                    break
                packet = await packet_class(header).from_stream(reader, fixed_header=header)
                await self.plugins_manager.fire_event(
                    MQTTEvents.PACKET_RECEIVED, packet=packet, session=session
                )
                if kind == mqtt_packet.PUBLISH and packet.qos == QOS_0 and not running:
                    await self.handle_publish(packet)
                else:
                    running.append(asyncio.create_task(getattr(self, name)(packet)))
            except (MQTTError, NoDataError) as exc:  # a malformed packet is dropped (as amqtt)
                log.debug("mqtt client %s: packet discarded: %r", session.client_id, exc)
            except asyncio.CancelledError:
                break
            except Exception as exc:  # anything else ends the connection (as amqtt)
                log.warning("mqtt reader of %s failed: %r", session.client_id, exc)
                break
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
        try:
            await self._settle(running)
        except asyncio.CancelledError:  # stopped meanwhile: end as amqtt does
            for task in running:
                task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()


class _FastBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with the ACL check and the agent tap called directly, not as tasks.

    A client's accepted PUBLISH goes ``_topic_filtering`` (PUBLISH, allowed) and then
    ``_broadcast_message`` with the same session and topic, in that session's message loop;
    will messages and the agent's own publishes reach ``_broadcast_message`` without the
    check. ``_accepted`` remembers the topic a session was just allowed to publish so only
    checked messages are tapped, as with the plugin hook (MESSAGE_BROADCAST).
    """

    def __init__(
        self,
        config: dict[str, Any],
        policy: BrokerPolicy,
        tls: DevicesTLS | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, **kwargs)
        self._policy = policy
        self._tls = tls
        self._accepted: dict[int, str] = {}
        # Per subscriber handler: its latest delivery on amqtt's path (see _deliver_qos0).
        self._slow: dict[int, asyncio.Task[Any]] = {}
        # Per subscriber handler: (handler, transport, frames) to write at the end of the turn.
        self._outbox: dict[int, tuple[Any, asyncio.WriteTransport, list[bytes]]] = {}

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if session is None or topic is None or action is None:
            return False
        allowed = self._policy.allow(session.username, action, topic)
        if allowed and action == Action.PUBLISH:
            self._accepted[id(session)] = topic
        return allowed

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if session is not None and topic and self._accepted.pop(id(session), None) == topic:
            tap = self._policy.tap
            if tap is not None:
                await tap(topic, bytes(data or b""))
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """Take one message off the broadcast queue and deliver it to every subscriber.

        The same decisions as amqtt's: every matching subscription, its QoS unless the
        message forces one, retained for a disconnected persistent session at QoS 1/2,
        skipped for other sessions not connected. The difference is how a QoS 0 delivery to
        a TCP client goes out: amqtt starts a task per delivery (``mqtt_publish``: message
        and packet objects, a write lock, ``drain``); here the PUBLISH bytes are made once
        per message and written to each subscriber's transport directly
        (:meth:`_deliver_qos0`). Everything else still takes amqtt's path.
        """
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data = broadcast["data"]
        forced = broadcast.get("qos")
        frame: bytes | None = None
        for a_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, a_filter):
                continue
            for target, sub_qos in subscriptions:
                qos = sub_qos if forced is None else forced
                # RECEIVE is allowed to everyone (see BrokerPolicy.allow): no check here.
                state = target.transitions.state
                if state != "connected":
                    if not target.clean_session and qos != QOS_0 and not target.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler is None:
                    continue
                if qos == QOS_0:
                    if frame is None:
                        frame = _publish_frame(topic, data or b"")
                    if self._deliver_qos0(handler, frame):
                        continue
                task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
                self._slow[id(handler)] = task
                running_tasks.append(task)

    def _deliver_qos0(self, handler: Any, frame: bytes) -> bool:
        """Queue a QoS 0 PUBLISH for a TCP subscriber; False: take amqtt's path.

        Frames queued for one subscriber in one turn of the event loop go out in one write
        at the end of the turn (:meth:`_flush`): under load, several replies share a send.
        Order per subscriber is kept: not while an earlier delivery of amqtt's path to it is
        pending or holds its write lock (queued frames are written before a later delivery
        task can run: both are FIFO callbacks of the loop). Only for plain stream writers
        (not websockets), with little unsent data (else amqtt's ``drain`` back-pressures),
        and when no plugin listens for sent packets.
        """
        key = id(handler)
        pending = self._slow.get(key)
        if pending is not None:
            if not pending.done():
                return False
            del self._slow[key]
        queued = self._outbox.get(key)
        if queued is not None:
            frames = queued[2]
            if sum(map(len, frames)) <= _DIRECT_WRITE_MAX_BUFFER:
                frames.append(frame)
                return True
            return False
        writer = handler.writer
        if type(writer) is not StreamWriterAdapter or writer.is_closed:
            return False
        lock = getattr(handler, "_write_lock", None)
        if lock is None or lock.locked() or self._packet_sent_hooks(handler):
            return False
        stream = getattr(writer, "_writer", None)
        transport = getattr(stream, "transport", None)
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > _DIRECT_WRITE_MAX_BUFFER:
            return False
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox[key] = (handler, transport, [frame])
        return True

    def _flush(self) -> None:
        """Write what :meth:`_deliver_qos0` queued, one write per subscriber. (No write-side
        keep-alive timer to re-arm: :class:`_Handler` enforces keep-alive on reads.)"""
        outbox, self._outbox = self._outbox, {}
        for _handler, transport, frames in outbox.values():
            if transport.is_closing():
                continue  # gone meanwhile: QoS 0 is at most once
            transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    @staticmethod
    def _packet_sent_hooks(handler: Any) -> bool:
        callbacks = getattr(handler.plugins_manager, "_event_plugin_callbacks", None)
        return callbacks is None or bool(callbacks.get(MQTTEvents.PACKET_SENT))

    async def _broadcast_loop(self) -> None:
        """amqtt's loop, without a task and an ``asyncio.wait`` per message.

        amqtt wraps each ``_run_broadcast`` (take one message, start its deliveries) in a
        task and waits for it or for shutdown; here it runs inline and shutdown cancels the
        loop instead. Delivery tasks are reaped as amqtt does.
        """
        running: deque[asyncio.Task[Any]] = self._tasks_queue
        me = asyncio.current_task()
        stop = self._broadcast_shutdown_waiter
        if me is not None:
            stop.add_done_callback(lambda _: me.cancel())
        try:
            while not stop.done():
                while running and running[0].done():
                    task = running.popleft()
                    if not task.cancelled() and task.exception() is not None:
                        log.warning("mqtt delivery failed: %r", task.exception())
                try:
                    await self._run_broadcast(running)
                except Exception:  # one bad message must not end all delivery (as in amqtt)
                    log.exception("mqtt broadcast failed")
        except asyncio.CancelledError:
            if not stop.done():
                raise  # cancelled from outside, not a shutdown
        finally:
            pending = [t for t in running if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)

    async def _handle_client_session(
        self, reader: Any, writer: Any, client_session: Session, handler: Any, *args: Any
    ) -> None:
        if type(handler) is BrokerProtocolHandler:
            handler.__class__ = _Handler  # see _Handler; amqtt makes the handler itself
        await super()._handle_client_session(reader, writer, client_session, handler, *args)

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        """One client's loop: its PUBLISHes, SUBSCRIBEs, UNSUBSCRIBEs and its end.

        Theory of operation. The reader turns each packet into a queued item: a PUBLISH
        into the session's delivered-message queue (a QoS 1 one is acknowledged then), a
        (UN)SUBSCRIBE into its own queue, DISCONNECT or a lost connection into the
        disconnect waiter. Packets are queued in arrival order, so when the waiter fires
        every PUBLISH the client sent before it is already in the queue. amqtt's loop then
        stopped and those were lost (acknowledged QoS 1 ones too); here the loop first
        handles them, in order, then ends the session as amqtt does: a clean DISCONNECT
        discards the will, anything else publishes it (after those messages). A PUBLISH
        that breaks the protocol (bad topic) ends the loop at once, as in amqtt.
        """
        disconnect = asyncio.ensure_future(handler.wait_disconnect())
        subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                done, _ = await asyncio.wait(
                    [disconnect, subscribe, unsubscribe, deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if subscribe in done:
                    await self._handle_subscription(client_session, handler, subscribe)
                    subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe)
                    unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, deliver):
                        break
                    deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect in done:
                    if await self._drain_publishes(client_session, handler, deliver):
                        await self._handle_disconnect(client_session, handler, disconnect)
                    break
        except asyncio.CancelledError:
            log.debug("mqtt client loop of %s cancelled", client_session.client_id)
        finally:
            waiters = [disconnect, subscribe, unsubscribe, deliver]
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _drain_publishes(
        self, client_session: Session, handler: Any, deliver: asyncio.Future[Any]
    ) -> bool:
        """Handle the PUBLISHes queued before the client's end, in order; False if one
        broke the protocol (amqtt then closes without the disconnect handling)."""
        deliver.cancel()  # its get() returns None when cancelled; a taken message is kept
        first = (await asyncio.gather(deliver, return_exceptions=True))[0]
        queue = client_session.delivered_message_queue
        pending = [first] if first is not None and not isinstance(first, BaseException) else []
        # Only what is queued now: a takeover may already be feeding the same session.
        pending += [queue.get_nowait() for _ in range(queue.qsize())]
        loop = asyncio.get_running_loop()
        for message in pending:
            item: asyncio.Future[Any] = loop.create_future()
            item.set_result(message)
            if not await self._handle_message_delivery(client_session, handler, item):
                return False
        return True

    async def _stop_handler(self, handler: Any) -> None:
        # A session that goes away must not leave a stale entry (ids are reused).
        session = getattr(handler, "session", None)
        if session is not None:
            self._accepted.pop(id(session), None)
        self._slow.pop(id(handler), None)
        await super()._stop_handler(handler)

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        return _tls_context(self, listener)


class _PlainBroker(Broker):  # type: ignore[misc]
    """amqtt's broker as is, except for the TLS listener's context (see _tls_context)."""

    def __init__(self, config: dict[str, Any], tls: DevicesTLS | None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._tls = tls

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        return _tls_context(self, listener)


def _tls_context(broker: Any, listener: Any) -> ssl.SSLContext:
    # amqtt's own context makes client certificates optional; ours requires them.
    tls: DevicesTLS | None = getattr(broker, "_tls", None)
    if tls is None:
        return Broker._create_ssl_context(listener)  # type: ignore[no-any-return]
    return tls.server_context()
