"""Benchmark: device message -> route -> task callback -> reply, vs a plain MQTT round trip.

Setup, all on loopback in one run: edgevisor's DeviceService with its embedded amqtt broker
(registry auth + ACL plugins active) in a child process (the agent); the "device" is a
paho-mqtt client in this process, authenticated as a registered device.

- baseline: the device publishes to ``devices/bench/echo`` and is itself subscribed to it
  (publish -> broker -> subscriber; no agent involved);
- routed: the device publishes ``devices/bench/req``; the agent's client receives it, the
  route matches, the task callback runs, the agent publishes the result to
  ``devices/bench/reply`` where the device receives it. The task callback is a **no-op
  async function** (``noop_task``): it stands in for a warm task, so the figure is the
  devices layer's own cost, not a sandbox's.

Latency: sequential request/reply, one in flight, p50/p99. Throughput: the device publishes
at a fixed rate (QoS 0) for a few seconds and counts replies; "lossless" means every request
got its reply. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from edgevisor.devices.routes import Route, ToTask  # noqa: E402
from edgevisor.devices.service import DeviceService, DevicesSettings  # noqa: E402


async def noop_task(name: str, event: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's task: does nothing but echo the sequence number (labelled no-op)."""
    return {"seq": event["payload"]["seq"]}


class Device:
    """A paho-mqtt client that records when each sequence number comes back."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.arrived: dict[int, float] = {}
        self.cond = threading.Condition()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id="bench-device",
        )
        self.c.username_pw_set(user, password)
        self.c.on_message = self._on_message
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        seq = int(json.loads(msg.payload)["seq"])
        with self.cond:
            self.arrived[seq] = now
            self.cond.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, qos=0)
        if not done.wait(30):
            raise RuntimeError(f"no SUBACK for {topic}")

    def wait_for(self, seq: int, timeout_s: float) -> float:
        deadline = time.perf_counter() + timeout_s
        with self.cond:
            while seq not in self.arrived:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(f"reply {seq} did not arrive")
                self.cond.wait(left)
            return self.arrived[seq]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def latency(dev: Device, topic: str, n: int, base: int) -> list[float]:
    out: list[float] = []
    for i in range(n):
        seq = base + i
        t0 = time.perf_counter()
        dev.c.publish(topic, json.dumps({"seq": seq}), qos=0)
        out.append((dev.wait_for(seq, 30) - t0) * 1000)
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (the agent's sandboxes are among them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (those still alive)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def sustained(
    dev: Device, topic: str, rate: int, seconds: float, base: int, agent_pid: int | None = None
) -> dict[str, Any]:
    """Offer ``rate`` msgs/s for ``seconds``; with ``agent_pid``, also the CPU the agent
    process (and, separately, its whole process tree) spent per message: a figure that
    does not depend on how busy the rest of the machine is, unlike msgs/s."""
    n = int(rate * seconds)
    tree = _tree(agent_pid) if agent_pid is not None else []
    c0 = cpu_s(tree[:1]), cpu_s(tree)
    t0 = time.perf_counter()
    for i in range(n):
        target = t0 + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        dev.c.publish(topic, json.dumps({"seq": base + i}), qos=0)
    sent_s = time.perf_counter() - t0
    deadline = time.perf_counter() + 30
    with dev.cond:
        while time.perf_counter() < deadline:
            got = sum(1 for s in range(base, base + n) if s in dev.arrived)
            if got == n:
                break
            dev.cond.wait(0.2)
        got = sum(1 for s in range(base, base + n) if s in dev.arrived)
        last = max((dev.arrived[s] for s in range(base, base + n) if s in dev.arrived), default=t0)
    c1 = cpu_s(tree[:1]), cpu_s(tree)
    return {
        "agent_cpu_us_per_msg": (c1[0] - c0[0]) / n * 1e6 if tree else float("nan"),
        "tree_cpu_us_per_msg": (c1[1] - c0[1]) / n * 1e6 if tree else float("nan"),
        "rate": rate,
        "sent": n,
        "received": got,
        "offered_per_s": n / sent_s,
        "achieved_per_s": got / max(last - t0, 1e-9),
    }


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def agent(data_dir: str, link: str, external: str | None) -> None:
    """Child process: the agent (service + embedded broker unless external). Prints the
    broker port, then its stats as JSON when stdin closes."""
    settings = DevicesSettings(broker_port=0, agent_link=link, external_broker_url=external)
    svc = DeviceService(settings, Path(data_dir), noop_task)
    await svc.start()
    try:
        svc.add_device("bench", "bench-pw")
        await svc.add_route(
            Route("bench", "devices/bench/req", ToTask("noop", "devices/bench/reply"))
        )
        port = svc.broker.port if svc.broker is not None else 0
        print(port, flush=True)
        await asyncio.to_thread(sys.stdin.read)
        print(json.dumps(svc.stats()), flush=True)
    finally:
        await svc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(args: argparse.Namespace, link: str, mosquitto: bool) -> dict[str, Any]:
    """One broker configuration: latency (plain vs routed) and sustained rates."""
    with tempfile.TemporaryDirectory() as tmp:
        mosq: subprocess.Popen[bytes] | None = None
        external = None
        if mosquitto:
            mport = free_port()
            conf = Path(tmp) / "mosquitto.conf"
            conf.write_text(f"listener {mport} 127.0.0.1\nallow_anonymous true\n")
            mosq = subprocess.Popen(
                ["mosquitto", "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", mport), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            external = f"mqtt://127.0.0.1:{mport}"
        cmd = [sys.executable, __file__, "--agent", tmp, "--link", link]
        if external:
            cmd += ["--external", external]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            port = int(proc.stdout.readline()) or int(external.rsplit(":", 1)[1])  # type: ignore[union-attr]
            dev = Device(port, "bench", "bench-pw")
            dev.subscribe("devices/bench/echo")
            dev.subscribe("devices/bench/reply")
            latency(dev, "devices/bench/echo", 50, 10_000_000)  # warm-up
            latency(dev, "devices/bench/req", 50, 20_000_000)
            plain = latency(dev, "devices/bench/echo", args.n, 0)
            routed = latency(dev, "devices/bench/req", args.n, 1_000_000)
            rows = []
            base = 30_000_000
            for rate in (int(r) for r in args.rates.split(",")):
                for mode, topic in (
                    ("plain", "devices/bench/echo"),
                    ("routed", "devices/bench/req"),
                ):
                    row = sustained(dev, topic, rate, args.seconds, base, proc.pid)
                    rows.append({"mode": mode, **row})
                    base += 10_000_000
            dev.close()
            proc.stdin.close()
            stats = json.loads(proc.stdout.readline())
        finally:
            if proc.poll() is None:
                if proc.stdin is not None and not proc.stdin.closed:
                    proc.stdin.close()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if mosq is not None:
                mosq.kill()
                mosq.wait()
    return {"plain": plain, "routed": routed, "rows": rows, "stats": stats}


CONFIGS = {
    "embedded-inprocess": (
        "embedded amqtt broker, agent attached in-process (default)",
        "inprocess",
        False,
    ),
    "embedded-client": ("embedded amqtt broker, agent as privileged TCP client", "client", False),
    "mosquitto": ("external mosquitto 2.0 broker, agent as TCP client", "client", True),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="sequential requests per mode")
    ap.add_argument("--rates", default="500,1000,2000", help="sustained rates, msgs/s")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--agent", help=argparse.SUPPRESS)
    ap.add_argument("--link", default="inprocess", help=argparse.SUPPRESS)
    ap.add_argument("--external", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agent:
        out = os.environ.get("EV_BENCH_PROFILE")  # cProfile the agent into this file
        if not out:
            asyncio.run(agent(args.agent, args.link, args.external))
            return 0
        import cProfile

        with cProfile.Profile() as prof:
            asyncio.run(agent(args.agent, args.link, args.external))
        prof.dump_stats(out)
        return 0

    print(
        "Device (paho-mqtt, own process) -> broker -> agent route -> task callback "
        "(**no-op async function**, not a sandboxed task) -> reply topic -> device. "
        "Baseline: plain publish -> subscribe round trip through the same broker. "
        f"{args.n} sequential requests per path for latency; QoS 0 throughout; the agent "
        "runs in its own process.\n"
    )
    for key in args.configs.split(","):
        title, link, mosquitto = CONFIGS[key]
        res = run_config(args, link, mosquitto)
        plain, routed = res["plain"], res["routed"]
        p50p, p99p = pct(plain, 50), pct(plain, 99)
        p50r, p99r = pct(routed, 50), pct(routed, 99)
        print(f"### {title}\n")
        print("| path | p50 ms | p99 ms | mean ms |")
        print("|---|---:|---:|---:|")
        print(
            f"| plain publish -> subscribe | {p50p:.2f} | {p99p:.2f} | "
            f"{statistics.mean(plain):.2f} |"
        )
        print(
            f"| routed to no-op task + reply | {p50r:.2f} | {p99r:.2f} | "
            f"{statistics.mean(routed):.2f} |"
        )
        print(f"| ratio routed / plain | {p50r / p50p:.2f}x | {p99r / p99p:.2f}x | |")
        print(f"\nSustained load, {args.seconds:.0f} s per rate:\n")
        print(
            "| path | offered msgs/s | sent | received | lost | achieved msgs/s "
            "| agent CPU µs/msg |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            print(
                f"| {r['mode']} | {r['offered_per_s']:.0f} | {r['sent']} | {r['received']} | "
                f"{r['sent'] - r['received']} | {r['achieved_per_s']:.0f} "
                f"| {r['agent_cpu_us_per_msg']:.0f} |"
            )
        st = res["stats"]
        print(
            f"\nAgent counters: {st['messages_in']} messages in, {st['task_calls']} task "
            f"calls, {st['task_errors']} errors, {st['dead_letters']} dead letters.\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
