"""QoS 0 deliveries of the embedded broker go straight to the subscriber's socket, several
per write under load, and fall back to amqtt's path when much is unsent: every subscriber
still gets every message once, in order, also across that switch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from devices_mqtt_helpers import pub, sub

from edgevisor.devices.routes import Route, ToTask

Make = Callable[..., Awaitable[Any]]  # conftest.make_service -> Harness

pytestmark = pytest.mark.timeout(120)


def _payload(i: int) -> str:
    # Every 37th message is large: a burst of them exceeds what is written directly, so
    # the deliveries switch to amqtt's path and back while the burst goes out.
    return f"{i}:" + ("x" * 40_000 if i % 37 == 0 else "y")


async def test_devices_delivery_burst_in_order_to_every_subscriber(make_service: Make) -> None:
    h = await make_service()
    h.svc.add_device("d1", "pw1")
    broker = h.svc.broker
    assert broker is not None
    amqtt_broker: Any = broker._broker
    direct: list[bool] = []
    deliver = amqtt_broker._deliver_qos0

    def spy(handler: Any, frame: bytes) -> bool:
        direct.append(deliver(handler, frame))
        return direct[-1]

    amqtt_broker._deliver_qos0 = spy
    n = 400
    async with (
        sub(h.port, "d1", "pw1", "devices/d1/out") as s1,
        sub(h.port, "d1", "pw1", "devices/d1/out") as s2,
    ):
        # One burst, no pause: the broadcast loop takes them in one turn of the loop.
        for i in range(n):
            await broker.publish("devices/d1/out", _payload(i).encode())
        for s in (s1, s2):
            got = await s.messages(n, timeout_s=60)
            assert [t for t, _ in got] == ["devices/d1/out"] * n
            assert [p for _, p in got] == [_payload(i) for i in range(n)]
        await asyncio.sleep(0.3)
        assert len(s1.lines) == len(s2.lines) == n  # nothing twice
    # Both ways were taken (else this test would not test the switch).
    assert direct.count(True) > 0 and direct.count(False) > 0, direct.count(True)


async def test_devices_delivery_device_to_device_and_routed_reply(make_service: Make) -> None:
    async def echo(name: str, event: dict[str, Any]) -> Any:
        return {"n": event["payload"]["n"]}

    h = await make_service(echo)
    h.svc.add_device("d1", "pw1")
    await h.svc.add_route(Route("r", "devices/d1/req", ToTask("t", "devices/d1/reply")))
    async with sub(h.port, "d1", "pw1", "devices/d1/reply", "devices/d1/chat") as s:
        for i in range(20):
            rc, err = await pub(h.port, "d1", "pw1", "devices/d1/req", f'{{"n": {i}}}')
            assert rc == 0, err
            rc, err = await pub(h.port, "d1", "pw1", "devices/d1/chat", f"c{i}")
            assert rc == 0, err
        got = await s.messages(40)
        assert [p for t, p in got if t == "devices/d1/chat"] == [f"c{i}" for i in range(20)]
        assert [p for t, p in got if t == "devices/d1/reply"] == [f'{{"n":{i}}}' for i in range(20)]
