"""The embedded broker's fast path (ACL check and agent tap called inline, not as tasks).

It must decide exactly as the plugin hooks did: only ACL-checked publishes reach the agent
(never a will message, which amqtt broadcasts without a check), in the order one device sent
them, and stopping the broker still ends its broadcast loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from devices_mqtt_helpers import pub, sub, wait_for

from edgevisor.devices import broker as broker_mod
from edgevisor.devices.routes import Route, ToTask

Make = Callable[..., Awaitable[Any]]  # conftest.make_service -> Harness


def test_devices_fastpath_active_on_this_amqtt() -> None:
    # If amqtt's internals change, the broker silently falls back to the plugin hooks; this
    # says so here instead of as a slowdown in the benchmark.
    assert broker_mod._FAST_PATH


async def test_devices_fastpath_will_message_is_not_routed(make_service: Make) -> None:
    h = await make_service()
    h.svc.add_device("d1", "pw1")
    await h.svc.add_route(Route("all", "devices/d1/#", ToTask("t")))
    # A client with a will on a routed topic, killed without DISCONNECT: the broker
    # publishes the will (subscribers see it) but the agent must not route it.
    args = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(h.port), "-u", "d1", "-P", "pw1",
            "-t", "devices/d1/none", "--will-topic", "devices/d1/status",
            "--will-payload", '{"gone": true}', "-k", "60"]  # fmt: skip
    async with sub(h.port, "d1", "pw1", "devices/d1/status") as watcher:
        proc = await asyncio.create_subprocess_exec(*args)
        await wait_for(lambda: h.svc.stats()["broker"]["connections_accepted"] >= 2)
        proc.kill()
        await proc.wait()
        [(topic, payload)] = await watcher.messages(1)
        assert (topic, json.loads(payload)) == ("devices/d1/status", {"gone": True})
        rc, err = await pub(h.port, "d1", "pw1", "devices/d1/status", '{"n": 1}')
        assert rc == 0, err
        await wait_for(lambda: len(h.calls) == 1)
        await asyncio.sleep(0.3)
    assert [c[1]["payload"] for c in h.calls] == [{"n": 1}]


async def test_devices_fastpath_dropped_publish_not_routed_then_allowed_one_is(
    make_service: Make,
) -> None:
    h = await make_service()
    h.svc.add_device("d1", "pw1")
    h.svc.add_device("d2", "pw2")
    await h.svc.add_route(Route("temp", "devices/+/temp", ToTask("t")))
    rc, _ = await pub(h.port, "d1", "pw1", "devices/d2/temp", '{"spoof": 1}')
    assert rc == 0
    await wait_for(lambda: h.svc.stats()["broker"]["publishes_dropped"].get("d1") == 1)
    rc, _ = await pub(h.port, "d1", "pw1", "devices/d1/temp", '{"ok": 1}')
    await wait_for(lambda: len(h.calls) == 1)
    await asyncio.sleep(0.3)
    assert [c[1]["payload"] for c in h.calls] == [{"ok": 1}]


async def test_devices_fastpath_keeps_one_devices_order(make_service: Make) -> None:
    h = await make_service()
    h.svc.add_device("d1", "pw1")
    await h.svc.add_route(Route("seq", "devices/d1/seq", ToTask("t")))
    n = 300
    # One mosquitto_pub connection sends every line of stdin as a message, in order.
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(h.port), "-u", "d1", "-P", "pw1",
        "-t", "devices/d1/seq", "-l", stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write("".join(f'{{"i": {i}}}\n' for i in range(n)).encode())
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    await wait_for(lambda: len(h.calls) == n, timeout_s=60)
    assert [c[1]["payload"]["i"] for c in h.calls] == list(range(n))


async def test_devices_fastpath_broker_stops_promptly(make_service: Make) -> None:
    h = await make_service()
    h.svc.add_device("d1", "pw1")
    async with sub(h.port, "d1", "pw1", "devices/d1/x") as s:
        rc, _ = await pub(h.port, "d1", "pw1", "devices/d1/x", "1")
        assert rc == 0
        await s.messages(1)
    broker = h.svc.broker
    assert broker is not None
    # Generous bound: amqtt's own shutdown waits up to its timeout for a stuck loop.
    await asyncio.wait_for(broker.stop(), 30)
    assert broker._broker is None
