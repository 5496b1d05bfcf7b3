"""A simulated temperature sensor: a coordinated device speaking MQTT 3.1.1 (paho-mqtt).

It publishes readings ``{"temp": <celsius>, "seq": n}`` on ``devices/<username>/readings``,
listens for its shadow's delta on ``edgevisor/shadow/<username>/delta``, applies it and
reports it back (``edgevisor/shadow/<username>/update`` with ``state.reported``), as a real
device would. Register it first (``edgevisor device add sensor1`` prints the username and
password), then::

    python examples/devices/sensor.py --username acme.sensor1 --password ... \\
        --expect fan=on

Exit status: 0 when the expected delta arrived (or, without ``--expect``, after the last
reading), 1 on timeout, 2 if the broker refused the credentials.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--username", required=True, help="<account>.<device>")
    ap.add_argument("--password", required=True)
    ap.add_argument("--readings", type=int, default=10, help="How many readings to send.")
    ap.add_argument("--interval", type=float, default=0.5, help="Seconds between readings.")
    ap.add_argument("--start", type=float, default=20.0, help="First temperature (C).")
    ap.add_argument("--step", type=float, default=3.0, help="Rise per reading (C).")
    ap.add_argument("--expect", help="KEY=VALUE that a delta must carry, e.g. fan=on.")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)

    url = urlparse(args.broker)
    me = args.username
    delta_topic = f"edgevisor/shadow/{me}/delta"
    want = tuple(args.expect.split("=", 1)) if args.expect else None
    connected = threading.Event()
    refused = threading.Event()
    matched = threading.Event()
    applied: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if reason.is_failure:
            print(f"broker refused the connection: {reason}", file=sys.stderr)
            refused.set()
            return
        c.subscribe(delta_topic, qos=1)
        connected.set()

    def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        delta = json.loads(msg.payload)
        state = delta.get("state", {})
        print(f"delta v{delta.get('version')}: {json.dumps(state)}", flush=True)
        applied.update(state)  # "apply" it, then tell the shadow what we now run
        c.publish(f"edgevisor/shadow/{me}/update",
                  json.dumps({"state": {"reported": state}}), qos=1)  # fmt: skip
        if want is not None and str(state.get(want[0])) == want[1]:
            matched.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-{me}",
                         protocol=mqtt.MQTTv311)  # fmt: skip
    client.username_pw_set(me, args.password)
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    try:
        deadline = time.monotonic() + args.timeout
        while not (connected.is_set() or refused.is_set()):
            if time.monotonic() > deadline:
                print("no answer from the broker", file=sys.stderr)
                return 1
            time.sleep(0.05)
        if refused.is_set():
            return 2
        temp = args.start
        for seq in range(args.readings):
            reading = {"temp": round(temp, 1), "seq": seq}
            client.publish(f"devices/{me}/readings", json.dumps(reading), qos=1).wait_for_publish(
                10
            )
            print(f"reading {json.dumps(reading)}", flush=True)
            temp += args.step
            if matched.wait(args.interval):
                break
        if want is None:
            return 0
        if matched.wait(max(0.0, deadline - time.monotonic())):
            print(f"device state now {json.dumps(applied)}", flush=True)
            return 0
        print(f"no delta with {args.expect} within {args.timeout} s", file=sys.stderr)
        return 1
    finally:
        client.loop_stop()
        client.disconnect()


if __name__ == "__main__":
    sys.exit(main())
