"""The embedded broker handles every PUBLISH a client sent before it went away (issue 4).

amqtt ends a client's message loop as soon as DISCONNECT (or EOF) is seen, while PUBLISH
packets already read (QoS 1 ones already acknowledged) still wait in the session's queue;
a device that sends a burst and disconnects at once lost its last messages whenever the
agent was slower than the device. Here the agent's tap is deliberately slow, so the queue
is long when DISCONNECT arrives. Also: keep-alive is enforced (silent past 1.5x keep-alive:
closed, will published) without amqtt's per-packet read timeout.

The device is a raw MQTT 3.1.1 client (a socket and hand-made packets): it can put the
whole burst and the DISCONNECT into one write, which no command-line client guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from devices_mqtt_helpers import wait_for

from edgevisor.devices.broker import AGENT_USERNAME, EmbeddedBroker
from edgevisor.devices.registry import DeviceRegistry

pytestmark = pytest.mark.timeout(120)


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def connect_packet(
    client_id: str,
    user: str,
    password: str,
    *,
    keepalive_s: int = 60,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    flags = 0x80 | 0x40 | 0x02  # username, password, clean session
    payload = _s(client_id)
    if will is not None:
        flags |= 0x04  # will flag, will QoS 0, no retain
        payload += _s(will[0]) + _s(will[1])
    payload += _s(user) + _s(password)
    body = _s("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s) + payload
    return _packet(0x10, body)


def publish_packet(topic: str, data: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    body = _s(topic) + (struct.pack("!H", packet_id) if qos else b"") + data
    return _packet(0x30 | (qos << 1), body)


def subscribe_packet(topic: str, packet_id: int = 1) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id) + _s(topic) + b"\x00")


DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


async def read_packets(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
    """(first byte, body) of each packet until EOF."""
    while True:
        try:
            first = (await reader.readexactly(1))[0]
            size, shift = 0, 0
            while True:
                byte = (await reader.readexactly(1))[0]
                size |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            body = await reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        yield first, body


async def open_client(
    port: int, client_id: str, user: str, password: str, **kw: object
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(client_id, user, password, **kw))  # type: ignore[arg-type]
    await writer.drain()
    connack = await asyncio.wait_for(reader.readexactly(4), 30)
    assert connack == b"\x20\x02\x00\x00", connack
    return reader, writer


@dataclass
class Watcher:
    """A subscriber (the agent's own credentials) collecting (topic, payload)."""

    got: list[tuple[str, bytes]] = field(default_factory=list)

    async def pump(self, reader: asyncio.StreamReader) -> None:
        async for first, body in read_packets(reader):
            if first >> 4 == 3:
                (n,) = struct.unpack("!H", body[:2])
                self.got.append((body[2 : 2 + n].decode(), body[2 + n :]))


@dataclass
class Rig:
    broker: EmbeddedBroker
    tapped: list[tuple[str, bytes]]
    watcher: Watcher


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    registry = DeviceRegistry(sqlite3.connect(":memory:"))
    registry.add("d1", "pw1")
    broker = EmbeddedBroker(registry, port=0)
    tapped: list[tuple[str, bytes]] = []

    async def slow_tap(topic: str, payload: bytes) -> None:
        # A busy agent: the device's queue in the broker grows while this runs.
        tapped.append((topic, payload))
        await asyncio.sleep(0.002)

    await broker.start()
    broker.attach(slow_tap)
    watcher = Watcher()
    r, w = await open_client(broker.port, "watcher", AGENT_USERNAME, broker.agent_password)
    pump = asyncio.create_task(watcher.pump(r))
    try:
        w.write(subscribe_packet("devices/d1/#"))
        await w.drain()
        await asyncio.sleep(0.2)  # SUBACK; nothing to assert on
        yield Rig(broker, tapped, watcher)
    finally:
        w.close()
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        await broker.stop()


async def settle(cond: Callable[[], bool]) -> None:
    """Wait (generously) for ``cond``; the asserts after it say what is missing."""
    with contextlib.suppress(AssertionError):
        await wait_for(cond, timeout_s=20)


def burst(n: int) -> tuple[bytes, list[bytes]]:
    """n QoS 0 then n QoS 1 PUBLISH packets to devices/d1/seq, and their payloads in order."""
    payloads = [f"{i}".encode() for i in range(2 * n)]
    frames = [publish_packet("devices/d1/seq", p) for p in payloads[:n]]
    frames += [
        publish_packet("devices/d1/seq", p, qos=1, packet_id=i + 1)
        for i, p in enumerate(payloads[n:])
    ]
    return b"".join(frames), payloads


@pytest.mark.parametrize("rounds", [3])
async def test_devices_broker_publish_burst_then_disconnect_loses_nothing(
    rig: Rig, rounds: int
) -> None:
    n = 150
    for round_ in range(rounds):
        rig.tapped.clear()
        rig.watcher.got.clear()
        data, payloads = burst(n)
        reader, writer = await open_client(
            rig.broker.port, f"dev-{round_}", "d1", "pw1", will=("devices/d1/status", b"gone")
        )
        writer.write(data + DISCONNECT)
        await writer.drain()
        acks = [body async for first, body in read_packets(reader) if first == 0x40]
        writer.close()
        await settle(lambda: len(rig.tapped) >= 2 * n and len(rig.watcher.got) >= 2 * n)
        await asyncio.sleep(0.3)  # a will (it must not come) or a duplicate would show now
        assert len(rig.tapped) == 2 * n, f"round {round_}: {2 * n - len(rig.tapped)} lost"
        assert [p for _, p in rig.tapped] == payloads
        assert rig.watcher.got == [("devices/d1/seq", p) for p in payloads]
        # Every QoS 1 PUBLISH that was read before DISCONNECT was acknowledged.
        assert sorted(struct.unpack("!H", a)[0] for a in acks) == list(range(1, n + 1))


async def test_devices_broker_burst_disconnect_and_eof_in_one_go(rig: Rig) -> None:
    # As mosquitto_pub does: DISCONNECT and close right after the last PUBLISH, so the
    # broker may read all of it, EOF included, before handling any of it.
    n = 150
    for round_ in range(3):
        rig.tapped.clear()
        rig.watcher.got.clear()
        data, payloads = burst(n)
        reader, writer = await open_client(
            rig.broker.port, f"dev-eof-{round_}", "d1", "pw1", will=("devices/d1/status", b"x")
        )
        writer.write(data + DISCONNECT)
        writer.write_eof()
        await asyncio.wait_for(_drain(reader), 30)
        writer.close()
        await settle(lambda: len(rig.tapped) >= 2 * n and len(rig.watcher.got) >= 2 * n)
        await asyncio.sleep(0.3)  # a will (it must not come) would show now
        assert len(rig.tapped) == 2 * n, f"round {round_}: {2 * n - len(rig.tapped)} lost"
        assert [p for _, p in rig.tapped] == payloads
        assert rig.watcher.got == [("devices/d1/seq", p) for p in payloads]


async def test_devices_broker_qos2_released_then_disconnect_delivered_once(rig: Rig) -> None:
    k = 20
    payloads = [f"q2-{i}".encode() for i in range(k)]
    reader, writer = await open_client(rig.broker.port, "dev-q2", "d1", "pw1")
    writer.write(
        b"".join(
            publish_packet("devices/d1/q2", p, qos=2, packet_id=i + 1)
            for i, p in enumerate(payloads)
        )
    )
    await writer.drain()
    packets = read_packets(reader)
    recs = [await anext(packets) for _ in range(k)]
    assert {first for first, _ in recs} == {0x50}  # PUBREC each
    # PUBREL for the first half only, then leave at once: the released ones are delivered
    # (once, in order); the others stay the client's to resend (MQTT 4.3.3).
    writer.write(b"".join(_packet(0x62, struct.pack("!H", i + 1)) for i in range(k // 2)))
    writer.write(DISCONNECT)
    writer.write_eof()
    await asyncio.wait_for(_drain(reader), 30)
    writer.close()
    await settle(lambda: len(rig.tapped) >= k // 2)
    await asyncio.sleep(0.3)
    assert [p for _, p in rig.tapped] == payloads[: k // 2]
    assert rig.watcher.got == [("devices/d1/q2", p) for p in payloads[: k // 2]]


async def test_devices_broker_burst_then_connection_drop_delivers_then_will(rig: Rig) -> None:
    # No DISCONNECT: what was received still goes out, in order, and then the will.
    n = 150
    data, payloads = burst(n)
    _, writer = await open_client(
        rig.broker.port, "dev-drop", "d1", "pw1", will=("devices/d1/status", b"gone")
    )
    writer.write(data)
    await writer.drain()
    writer.transport.abort()
    await settle(lambda: len(rig.watcher.got) >= 2 * n + 1)
    assert len(rig.tapped) == 2 * n, f"{2 * n - len(rig.tapped)} lost"
    assert [p for _, p in rig.tapped] == payloads  # the will is not ACL-checked: not tapped
    assert rig.watcher.got == [("devices/d1/seq", p) for p in payloads] + [
        ("devices/d1/status", b"gone")
    ]


async def test_devices_broker_keepalive_silent_client_is_closed_with_will(rig: Rig) -> None:
    reader, writer = await open_client(
        rig.broker.port, "dev-silent", "d1", "pw1", keepalive_s=1, will=("devices/d1/status", b"x")
    )
    # Spec 3.1.2.10: disconnected after 1.5x keep-alive of silence; generous deadline here.
    packets = await asyncio.wait_for(_drain(reader), 20)
    assert packets == []
    await wait_for(lambda: ("devices/d1/status", b"x") in rig.watcher.got, timeout_s=20)
    writer.close()


async def test_devices_broker_keepalive_active_client_stays(rig: Rig) -> None:
    reader, writer = await open_client(rig.broker.port, "dev-ping", "d1", "pw1", keepalive_s=2)
    # Pings every 0.2 s for 6 s (2x the 1.5x keep-alive): each resets the idle clock.
    pongs = 0
    for _ in range(30):
        writer.write(PINGREQ)
        await writer.drain()
        first = await asyncio.wait_for(reader.readexactly(2), 20)
        assert first == b"\xd0\x00"
        pongs += 1
        await asyncio.sleep(0.2)
    writer.write(publish_packet("devices/d1/alive", b"yes") + DISCONNECT)
    await writer.drain()
    await wait_for(lambda: ("devices/d1/alive", b"yes") in rig.watcher.got, timeout_s=20)
    assert pongs == 30
    writer.close()


async def _drain(reader: asyncio.StreamReader) -> list[int]:
    return [first async for first, _ in read_packets(reader)]
