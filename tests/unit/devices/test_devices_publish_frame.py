"""The embedded broker writes QoS 0 PUBLISH packets itself: byte for byte what amqtt makes,
across the remaining-length sizes (1 to 3 bytes)."""

from __future__ import annotations

import pytest
from amqtt.mqtt.publish import PublishPacket

from edgevisor.devices.broker_amqtt import _publish_frame


@pytest.mark.parametrize(
    "size", [0, 1, 100, 127 - 9, 128 - 9, 200, 16383 - 9, 16384 - 9, 70_000, 2_097_151 - 9]
)
@pytest.mark.parametrize("topic", ["devices/d1/out", "devices/ü/x"])
def test_devices_publish_frame_matches_amqtt(size: int, topic: str) -> None:
    payload = bytes(i % 251 for i in range(size))
    ours = _publish_frame(topic, payload)
    theirs = PublishPacket.build(topic, payload, None, False, 0, False).to_bytes()
    assert ours == bytes(theirs)
    assert ours[0] == 0x30  # PUBLISH, QoS 0, no DUP, no RETAIN


def test_devices_publish_frame_takes_bytearray() -> None:
    assert _publish_frame("a/b", bytearray(b"xy")) == _publish_frame("a/b", b"xy")
