"""Benchmark: remap of one record, API call -> applied on the hosts (root).

A controller (SQLite store) and two real agent processes in a 2-host ``Topology``; one
bound record with an instance on each host. Each round moves the record to the other host
with ``POST /v1/addresses/{ref}/move`` (the migration hook); the call returns after the
controller pushed the new record to both hosts (old host first: fencing) and stored the
generation each applied, so its latency is "API call -> applied on the host". A second
series calls the agent's ``records.apply`` directly (one host: transport + nft apply) to
split the figure. Afterwards ``record list`` must show no drift.

The controller runs in this process, so the move calls are also split server-side: the
controller transaction (with its thread hop), the push to the old host (alone and first:
fencing), then the push to the new host; the rest of the client's figure is HTTP,
routing and auth.

Usage: ``.venv/bin/python bench/addresses/remap.py [--rounds 200]``; prints a markdown
table. Everything it creates (namespaces, processes, temp dir) is removed at the end.
A baseline of another tree in the same session: ``git archive <rev> src | tar -x -C
/tmp/base`` and run this file with ``PYTHONPATH=/tmp/base/src`` (the agents inherit it),
alternating with the current tree (2 shared cores: the figures swing with the load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from edgevisor import Client
from edgevisor.control import addr_sync, api_addresses
from edgevisor.store import repos
from edgevisor.testing.controller import RunningController, running_controller
from edgevisor.testing.topology import Topology

# Between rounds: the latency of one remap, not the rate of back-to-back remaps (an agent
# finishes the previous update's conntrack flush, ~10 ms, before it starts the next).
PAUSE_S = 0.05


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def agent_env(prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVISOR_")}
    return env | {
        "EDGEVISOR_AGENT__HEARTBEAT_INTERVAL_S": "0.5",
        "EDGEVISOR_AGENT__LISTEN_HOST": "0.0.0.0",
        "EDGEVISOR_AGENT__LISTEN_PORT": "7451",
        "EDGEVISOR_LOG_LEVEL": "warning",
        "EDGEVISOR_NETWORK__INSTANCE_NETNS_PREFIX": f"{prefix}-",
    }


_CLIENTS: dict[str, httpx.Client] = {}


def op(ctl: RunningController, host: str, name: str, payload: dict[str, Any]) -> Any:
    """Call an agent operation directly (a kept-alive connection, like the controller's)."""
    c = _CLIENTS.get(host)
    if c is None:
        with ctl.state.store.session() as s:
            h = repos.get_host(s, host)
            url, key = h.agent_url, h.agent_key
        c = _CLIENTS[host] = httpx.Client(base_url=str(url), timeout=30,
                                          headers={"authorization": f"Bearer {key}"})
    r = c.post(f"/agent/v1/ops/{name}", json=payload)
    r.raise_for_status()
    return r.json().get("result")


# Server-side phases of the move calls (the controller runs in this process): the
# controller transaction (thread hop included), the push to the host giving up the
# mapping, and the push to the rest; whatever remains of the client's figure is HTTP,
# routing and auth.
PHASES: dict[str, list[float]] = {"txn": [], "push_first": [], "push_rest": [], "push": []}
_ON = [False]


def instrument() -> None:
    txn_name = "_run"  # the move's transaction (in a thread)
    run0 = getattr(api_addresses, txn_name)
    push0 = getattr(api_addresses, "push")  # noqa: B009 - imported there, not exported
    push_host0 = addr_sync.push_host

    async def run_timed(st: Any, fn: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await run0(st, fn)
        finally:
            if _ON[0]:
                PHASES["txn"].append(time.perf_counter() - t0)

    async def push_timed(st: Any, change: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await push0(st, change)
        finally:
            if _ON[0]:
                PHASES["push"].append(time.perf_counter() - t0)

    first_done: list[float] = []

    async def push_host_timed(st: Any, host: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await push_host0(st, host, **kw)
        finally:
            if _ON[0]:
                first_done.append(time.perf_counter() - t0)

    setattr(api_addresses, txn_name, run_timed)
    setattr(api_addresses, "push", push_timed)  # noqa: B010
    setattr(addr_sync, "push_host", push_host_timed)  # noqa: B010
    PHASES["_pushes"] = first_done  # every push_host call, in order


def wait(pred: Any, what: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"{what}: not reached in {timeout_s}s")
        time.sleep(0.2)


def run(rounds: int, tmp: Path) -> list[tuple[str, str, str, str, str]]:
    with Topology(2) as topo, running_controller(
        tmp / "ctl", {"network.reconcile_interval_s": 5.0}, host=topo.controller_address
    ) as ctl:
        admin = Client(ctl.url, ctl.admin_token)
        port = int(ctl.url.rsplit(":", 1)[1])
        env = agent_env(topo.prefix)
        for h in topo.hosts:
            jt = admin.create_join_token(host=h.name).secret
            argv = topo.agent_argv(h, controller_port=port, join_token=jt,
                                   data_dir=tmp / h.name)
            # Share our mount namespace (as on a real host), keep the host's netns.
            argv = ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *argv]
            topo.start_agent(h, argv, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        wait(lambda: len([h for h in admin.list_hosts() if h.state == "up"]) == 2,
             "hosts up")
        assert topo.subnet is not None
        admin.create_physical_pool(str(list(topo.subnet.subnets(new_prefix=25))[1]))
        admin.create_account("bench")
        admin.create_network("net", "10.0.0.0/24", account="bench")
        h0, h1 = (h.name for h in topo.hosts)
        for addr, host, name in [("10.0.0.5", h0, "a"), ("10.0.0.7", h1, "b")]:
            admin.allocate_address("net", addr, account="bench")
            admin.bind_address(addr, f"{topo.prefix}{name}", host, account="bench")
            op(ctl, host, "instances.create",
               {"name": name, "account": "bench", "logical": addr})
        # Warm up, then time the moves of 10.0.0.7 between the hosts.
        where = [h0, h1]
        api: list[float] = []
        for k in range(rounds + 5):
            dst = where[k % 2]
            time.sleep(PAUSE_S)
            _ON[0] = k >= 5
            t0 = time.perf_counter()
            admin.move_address("10.0.0.7", dst, account="bench")
            if k >= 5:
                api.append(time.perf_counter() - t0)
        _ON[0] = False
        wait(lambda: all(not r.drift for r in admin.list_records(account="bench")),
             "no drift after the moves", 30)
        # The API floor: a read of the same record through the same client and server.
        api_get: list[float] = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            admin.get_address("10.0.0.7", account="bench")
            api_get.append(time.perf_counter() - t0)
        rec = next(r for r in admin.list_addresses(account="bench")
                   if r.logical == "10.0.0.7")
        direct: list[float] = []
        commits: list[float] = []
        base = rec.model_dump(mode="json")
        for k in range(rounds):
            # Alternate physical addresses inside the pool; only the table changes.
            phys = f"{topo.subnet.network_address + 200 + k % 2}"
            body = {"full": False, "removed": [], "records": [
                base | {"physical": phys, "generation": rec.generation}]}
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            res = op(ctl, h0, "records.apply", body)
            direct.append(time.perf_counter() - t0)
            commits.append(res["committed_s"])
        noop: list[float] = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            op(ctl, h0, "records.state", {})
            noop.append(time.perf_counter() - t0)
        admin.close()
        for c in _CLIENTS.values():
            c.close()
    ms = 1000.0
    # Each move pushes to both hosts (2 push_host calls).
    pushes = PHASES["_pushes"]
    per_move = len(pushes) // max(1, len(api))
    firsts = pushes[0::per_move] if per_move else []
    seconds = pushes[1::per_move] if per_move > 1 else []
    phase_rows = [
        ("  controller transaction (with thread hop)",
         PHASES["txn"]),
        ("  pushes, both hosts (wall)", PHASES["push"]),
        ("    push to the old host (fence: alone, first)", firsts),
        ("    push to the new host (after the old one answered)", seconds),
    ]
    return [
        ("move via API -> applied on both hosts", f"{pct(api, 10) * ms:.2f}",
         f"{pct(api, 50) * ms:.2f}", f"{pct(api, 99) * ms:.2f}", str(len(api))),
        *((name, f"{pct(xs, 10) * ms:.2f}", f"{pct(xs, 50) * ms:.2f}",
           f"{pct(xs, 99) * ms:.2f}", str(len(xs))) for name, xs in phase_rows if xs),
        ("  API floor: GET of the record (no change, no push)", f"{pct(api_get, 10) * ms:.2f}",
         f"{pct(api_get, 50) * ms:.2f}", f"{pct(api_get, 99) * ms:.2f}", str(len(api_get))),
        ("records.apply on one agent (HTTP round trip)", f"{pct(direct, 10) * ms:.2f}",
         f"{pct(direct, 50) * ms:.2f}", f"{pct(direct, 99) * ms:.2f}", str(len(direct))),
        ("records.state on one agent (HTTP round trip, no work)", f"{pct(noop, 10) * ms:.2f}",
         f"{pct(noop, 50) * ms:.2f}", f"{pct(noop, 99) * ms:.2f}", str(len(noop))),
        ("  of which nft commit in the agent", f"{pct(commits, 10) * ms:.3f}",
         f"{statistics.median(commits) * ms:.3f}", f"{pct(commits, 99) * ms:.3f}",
         str(len(commits))),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, nftables)")
    instrument()
    with tempfile.TemporaryDirectory(prefix="ev-remap-") as tmp:
        rows = run(args.rounds, Path(tmp))
    print("| remap of one record (target p50 <= 5 ms) | p10 ms | p50 ms | p99 ms | n |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")


if __name__ == "__main__":
    main()
