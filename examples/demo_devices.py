"""Demo of coordinated devices, against a running ``edgevisor up`` (``make demo`` calls it).

1. an account ``demo`` deploys the task ``examples/devices/thermostat``;
2. it registers the device ``sensor1`` (MQTT username ``demo.sensor1``);
3. route ``readings``: the sensor's readings call the thermostat task;
4. route ``fan``: the task's result is merged into the sensor's *desired* shadow;
5. the simulated sensor (``examples/devices/sensor.py``) publishes rising temperatures and
   waits for the delta ``fan=on`` on its shadow topic, then reports it back.

Exit status 0 when all of it happened (the shadow's desired and reported both say
``fan = on``). Uses the SDK (URL and admin token as the CLI finds them: EDGEVISOR_URL /
EDGEVISOR_TOKEN or the local ``edgevisor up`` defaults). Safe to run again.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from edgevisor import Client, Conflict, NotFound

HERE = Path(__file__).resolve().parent
ACCOUNT, DEVICE, TASK = "demo", "sensor1", "thermostat"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    with Client() as admin:
        step(f"account {ACCOUNT}")
        with contextlib.suppress(Conflict):
            admin.create_account(ACCOUNT)
        token = admin.create_token(ACCOUNT, name="demo-devices").secret
    with Client(admin.url, token) as c:
        step(f"deploy task {TASK}")
        info = c.deploy_task(HERE / "devices" / TASK)
        print(f"    version {info.version[:12]} on {', '.join(info.hosts)}")
        for name in ("fan", "readings"):  # a clean slate when run again
            with contextlib.suppress(NotFound):
                c.remove_route(name)
        with contextlib.suppress(NotFound):
            c.remove_device(DEVICE)
        step(f"register device {DEVICE}")
        dev = c.add_device(DEVICE)
        print(f"    broker {dev.broker_url}, username {dev.username}")
        step("route readings -> task, task result -> desired shadow")
        c.add_route({
            "name": "readings",
            "topic_filter": f"devices/{dev.username}/readings",
            "source_device": DEVICE,
            "destination": {"kind": "task", "task": TASK},
        })  # fmt: skip
        c.add_route({
            "name": "fan",
            "topic_filter": f"tasks/{ACCOUNT}.{TASK}/result",
            "source_task": TASK,
            "destination": {"kind": "shadow", "device": DEVICE, "section": "desired"},
        })  # fmt: skip
        step("simulated sensor publishes readings and waits for the delta fan=on")
        sensor = subprocess.run(
            [sys.executable, str(HERE / "devices" / "sensor.py"),
             "--broker", dev.broker_url, "--username", dev.username,
             f"--password={dev.password}", "--readings", "10", "--interval", "0.5",
             "--expect", "fan=on", "--timeout", "60"],
            timeout=120,
        )  # fmt: skip
        if sensor.returncode != 0:
            print(f"sensor exited with {sensor.returncode}", file=sys.stderr)
            return 1
        step("shadow as the controller sees it")
        deadline = time.monotonic() + 30
        while True:
            shadow = c.get_shadow(DEVICE)
            state = shadow.state
            if state["desired"].get("fan") == "on" and state["reported"].get("fan") == "on":
                break
            if time.monotonic() > deadline:
                print(f"shadow not converged: {state}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"    version {shadow.version}: desired={state['desired']} "
              f"reported={state['reported']}")  # fmt: skip
    step("devices demo done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
