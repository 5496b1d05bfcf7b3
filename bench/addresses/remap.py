"""Benchmark: remap of one record, API call -> applied on the hosts (root).

A controller (SQLite store) and two real agent processes in a 2-host ``Topology``; one
bound record with an instance on each host. Each round moves the record to the other host
with ``POST /v1/addresses/{ref}/move`` (the migration hook); the call returns after the
controller pushed the new record to both hosts (old host first: fencing) and stored the
generation each applied, so its latency is "API call -> applied on the host". A second
series calls the agent's ``records.apply`` directly (one host: transport + nft apply) to
split the figure. Afterwards ``record list`` must show no drift.

The controller runs in this process as ``edgevisor controller`` runs it (uvicorn on
uvloop, no access log), so the move calls are also split server-side: the time in the
controller (request in -> answer out), the controller transaction, the push to the old
host (alone and first: fencing), then the push to the new host; the rest of the client's
figure is HTTP and the client. The calls are made by two clients, interleaved round by
round (same load): a lean one (aiohttp, C parser, in a process of its own) and the SDK's
``Client`` (httpx, in this process), each labelled; the phases are of the lean client's
calls.

Usage: ``.venv/bin/python bench/addresses/remap.py [--rounds 200]``; prints a markdown
table. Everything it creates (namespaces, processes, temp dir) is removed at the end.
A baseline of another tree in the same session: ``git archive <rev> src | tar -x -C
/tmp/base`` and run this file with ``PYTHONPATH=/tmp/base/src`` (the agents inherit it),
alternating with the current tree (2 shared cores: the figures swing with the load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from edgevisor import Client
from edgevisor.control import api_addresses
from edgevisor.control.agent_http import AgentHttp
from edgevisor.control.app import create_app
from edgevisor.control.server import ensure_admin_token, open_store
from edgevisor.control.state import ControllerState
from edgevisor.httpserver import QuietServer, bound_port
from edgevisor.settings import load_settings
from edgevisor.store import repos
from edgevisor.testing.topology import Topology

try:  # absent from trees before it (a baseline run)
    from edgevisor.control import api_move_fast
except ImportError:  # pragma: no cover
    api_move_fast = None  # type: ignore[assignment]

# Between rounds: the latency of one remap, not the rate of back-to-back remaps (an agent
# finishes the previous update's conntrack cleanup, 0.1 s after it, before the next).
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


class Ctl:
    """The controller as ``edgevisor controller`` serves it, in a thread of this process."""

    def __init__(self, url: str, token: str, st: ControllerState) -> None:
        self.url, self.admin_token, self.state = url, token, st


@contextlib.contextmanager
def controller(data_dir: Path, host: str) -> Iterator[Ctl]:
    settings = load_settings(overrides={
        "data_dir": str(data_dir), "controller.listen_host": host,
        "controller.listen_port": 0, "network.reconcile_interval_s": 5.0,
    }, environ={})
    data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    st = ControllerState(settings=settings, store=store)
    token = ensure_admin_token(st).read_text().strip()
    app = create_app(st)
    # The move's fast path in front of FastAPI (a no-op once create_app installs it).
    if api_move_fast is not None:
        api_move_fast.install(app, st)

    async def timed_app(scope: Any, receive: Any, send: Any) -> None:
        """The app, timed from the request's arrival to its answer's last byte (wall and
        CPU time of the controller's thread: one request at a time, so it is this
        request's, awaits included)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        # Only a move's marks: an agent's heartbeat served meanwhile must not touch them.
        is_move = scope["type"] == "http" and scope["path"].endswith("/move")
        if is_move:
            _MARKS.clear()
            _CALLS.clear()
            _MARKS["in"] = t0
        if _PROFILE is not None and _ON[0]:
            _PROFILE.enable()  # the controller's thread only
        try:
            await app(scope, receive, send)
        finally:
            if _PROFILE is not None:
                _PROFILE.disable()
            if _ON[0] and is_move:
                MOVES.append((list(_CALLS), dict(_MARKS)))
                t1 = time.perf_counter()
                PHASES["server"].append(t1 - t0)
                PHASES["server_cpu"].append(time.thread_time() - c0)
                if "pushed" in _MARKS:
                    PHASES["after"].append(t1 - _MARKS["pushed"])

    server = QuietServer(uvicorn.Config(timed_app, host=host, port=0,
                                        log_level="warning", access_log=False))

    def serve() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("controller did not start")
        time.sleep(0.02)
    try:
        yield Ctl(f"http://{host}:{bound_port(server)}", token, st)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.dispose()


# The lean client runs in a process of its own (its own interpreter lock: in this
# process it would wait for the controller's thread to let go of it). One JSON line per
# call in: [method, url, token, body]; one out: [seconds, status, answer]; the clock runs
# around the call only.
_LEAN = r"""
import asyncio, json, sys, time
import aiohttp, uvloop

async def main():
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            method, url, token, body = json.loads(line)
            t0 = time.perf_counter()
            async with session.request(method, url, json=body,
                                       headers={"authorization": "Bearer " + token}) as r:
                data = await r.json()
                took = time.perf_counter() - t0
            sys.stdout.write(json.dumps([took, r.status, data]) + "\n")
            sys.stdout.flush()

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""


class Lean:
    """The lean client: aiohttp on uvloop with kept-alive connections, in its own process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _LEAN], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.agents: dict[str, tuple[str, str]] = {}

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)

    def timed(self, method: str, url: str, token: str, body: Any = None) -> tuple[float, Any]:
        """(seconds, JSON answer) of one call."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([method, url, token, body]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the lean client died")
        took, status, data = json.loads(line)
        if status >= 400:
            raise SystemExit(f"{method} {url}: {status} {data}")
        return float(took), data

    def op(self, ctl: Ctl, host: str, name: str, payload: dict[str, Any]) -> tuple[float, Any]:
        """Call an agent operation directly (a kept-alive connection, like the controller's)."""
        if host not in self.agents:
            with ctl.state.store.session() as s:
                h = repos.get_host(s, host)
                self.agents[host] = (str(h.agent_url), str(h.agent_key))
        url, key = self.agents[host]
        took, data = self.timed("POST", f"{url}/agent/v1/ops/{name}", key, payload)
        return took, data.get("result")


# Server-side phases of the lean client's move calls (the controller runs in this
# process): the controller transaction (thread hop included), the push to the host
# giving up the mapping, and the push to the rest; whatever remains of the client's
# figure is HTTP, routing and auth.
PHASES: dict[str, list[float]] = {
    "server": [], "server_cpu": [], "before": [], "txn": [], "txn_cpu": [], "push": [],
    "after": [],
}
# The agent calls of the move being served, in the order they started: (op, wall s,
# what the agent reported of its own work: wall and CPU time of the op in the agent,
# and when the call started and ended here; host), and those of every timed move. The
# old host's push (the fence) is the first call that is not a records.prepare; the new
# host's is the first such call to another host (its records.commit after a
# records.prepare, or its records.apply).
Call = tuple[str, float, dict[str, float], str]  # op, wall s, timings, host
_CALLS: list[Call] = []
MOVES: list[tuple[list[Call], dict[str, float]]] = []
# Timestamps of the move being served: request in ("in"), transaction done ("txn"),
# pushes done ("pushed").
_MARKS: dict[str, float] = {}
_ON = [False]
# --profile FILE: cProfile of the controller's thread during the timed moves.
_PROFILE: cProfile.Profile | None = None


def instrument() -> None:
    txn_name = "_run"  # the move's transaction (in a thread)
    run0 = getattr(api_addresses, txn_name)
    push0 = getattr(api_addresses, "push")  # noqa: B009 - imported there, not exported

    async def run_timed(st: Any, fn: Any, *args: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        if _ON[0] and "in" in _MARKS:
            PHASES["before"].append(t0 - _MARKS["in"])
        try:
            return await run0(st, fn, *args)
        finally:
            _MARKS["txn"] = time.perf_counter()
            if _ON[0]:
                PHASES["txn"].append(_MARKS["txn"] - t0)
                PHASES["txn_cpu"].append(time.thread_time() - c0)

    async def push_timed(st: Any, change: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await push0(st, change)
        finally:
            _MARKS["pushed"] = time.perf_counter()
            if _ON[0]:
                PHASES["push"].append(_MARKS["pushed"] - t0)

    # The same phases when the move's fast path (api_move_fast, in front of FastAPI)
    # serves the call: its transaction is fast_move (on the event loop), then push.
    fast = getattr(api_move_fast, "fast_move", None) if api_move_fast is not None else None
    if fast is not None:
        def fast_timed(*args: Any, **kw: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            got = fast(*args, **kw)  # None or Busy: the route serves it (timed there)
            if got is not None:
                _MARKS["txn"] = time.perf_counter()
            if _ON[0] and got is not None and "in" in _MARKS:
                PHASES["before"].append(t0 - _MARKS["in"])
                PHASES["txn"].append(time.perf_counter() - t0)
                PHASES["txn_cpu"].append(time.thread_time() - c0)
            return got

        setattr(api_move_fast, "fast_move", fast_timed)  # noqa: B010
        setattr(api_move_fast, "push", push_timed)  # noqa: B010

    call0 = AgentHttp.call

    async def call_timed(self: AgentHttp, host: str, op: str, payload: Any, **kw: Any) -> Any:
        slot = len(_CALLS)
        _CALLS.append((op, 0.0, {}, host))
        t0 = time.perf_counter()
        result = await call0(self, host, op, payload, **kw)
        t1 = time.perf_counter()
        took = t1 - t0
        rep = {"t0": t0, "t1": t1}
        if isinstance(result, dict):
            rep.update({k: float(result[k]) for k in ("handled_s", "handled_cpu_s",
                                                      "committed_s") if k in result})
            if "started_s" in result and "handled_s" in result:
                # One monotonic clock on this machine: split the round trip.
                rep["up_s"] = float(result["started_s"]) - t0
                rep["down_s"] = t1 - float(result["started_s"]) - float(result["handled_s"])
        if slot < len(_CALLS):
            _CALLS[slot] = (op, took, rep, host)
        return result

    setattr(api_addresses, txn_name, run_timed)
    setattr(api_addresses, "push", push_timed)  # noqa: B010
    setattr(AgentHttp, "call", call_timed)  # noqa: B010


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def wait(pred: Any, what: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"{what}: not reached in {timeout_s}s")
        time.sleep(0.2)


Row = tuple[str, str, str, str, str]


def row(name: str, xs: list[float], digits: int = 2) -> Row:
    ms = 1000.0
    return (name, f"{pct(xs, 10) * ms:.{digits}f}", f"{statistics.median(xs) * ms:.{digits}f}",
            f"{pct(xs, 99) * ms:.{digits}f}", str(len(xs)))


def run(rounds: int, tmp: Path) -> list[Row]:
    with Topology(2) as topo, controller(tmp / "ctl", topo.controller_address) as ctl:
        admin = Client(ctl.url, ctl.admin_token)
        lean = Lean()
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
            lean.op(ctl, host, "instances.create",
                    {"name": name, "account": "bench", "logical": addr})
        # Warm up, then time the moves of 10.0.0.7 between the hosts; the two clients
        # take turns in pairs of rounds, so each moves the record both ways.
        where = [h0, h1]
        move_url = f"{ctl.url}/v1/addresses/10.0.0.7/move"
        api: list[float] = []
        api_httpx: list[float] = []
        agents = [p for p in (topo.agent(h) for h in topo.hosts) if p is not None]
        cpu0 = sum(tree_cpu_s(p.pid) for p in agents)
        for k in range(2 * rounds + 8):
            dst = where[k % 2]
            use_lean = (k // 2) % 2 == 0
            time.sleep(PAUSE_S)
            _ON[0] = k >= 8 and use_lean
            if use_lean:
                took, _ = lean.timed("POST", move_url, ctl.admin_token,
                                     {"host": dst, "account": "bench"})
            else:
                t0 = time.perf_counter()
                admin.move_address("10.0.0.7", dst, account="bench")
                took = time.perf_counter() - t0
            if k >= 8:
                (api if use_lean else api_httpx).append(took)
        _ON[0] = False
        # Everything the agents did per move: both pushes' work and what follows off the
        # path (links, conntrack cleanup), plus their idle chores (heartbeats).
        agent_cpu = (sum(tree_cpu_s(p.pid) for p in agents) - cpu0) / (2 * rounds + 8)
        wait(lambda: all(not r.drift for r in admin.list_records(account="bench")),
             "no drift after the moves", 30)
        # The API floor: a read of the same record through the same clients and server.
        get_url = f"{ctl.url}/v1/addresses/10.0.0.7?account=bench"
        api_get: list[float] = []
        api_get_httpx: list[float] = []
        for _ in range(rounds):
            api_get.append(lean.timed("GET", get_url, ctl.admin_token)[0])
            t0 = time.perf_counter()
            admin.get_address("10.0.0.7", account="bench")
            api_get_httpx.append(time.perf_counter() - t0)
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
            took, res = lean.op(ctl, h0, "records.apply", body)
            direct.append(took)
            commits.append(res["committed_s"])
        noop = [lean.op(ctl, h0, "records.state", {})[0] for _ in range(rounds)]
        noop_paused: list[float] = []
        empty: list[float] = []
        empty_commits: list[float] = []
        for _ in range(rounds):
            # Alternated, both after the same pause: an idle agent (and vCPU) wakes up
            # for each; the difference is the apply's own path.
            time.sleep(PAUSE_S)
            noop_paused.append(lean.op(ctl, h0, "records.state", {})[0])
            time.sleep(PAUSE_S)
            took, res = lean.op(ctl, h0, "records.apply",
                                {"full": False, "records": [], "removed": []})
            empty.append(took)
            empty_commits.append(res["committed_s"])
        lean.close()
        admin.close()
    # Per move: the old host's push, the new host's (its commit, or its plain apply).
    firsts: list[float] = []
    seconds: list[float] = []
    prepares: list[float] = []
    olds: list[dict[str, float]] = []
    news: list[dict[str, float]] = []
    committed = 0
    gaps: dict[str, list[float]] = {"to_old": [], "old_to_new": [], "new_to_done": []}
    for calls, marks in MOVES:
        pushes = [c for c in calls if c[0] != "records.prepare"]
        if not pushes:
            continue
        fence = pushes[0]
        old_host = fence[3]
        prepares += [c[1] for c in calls if c[0] == "records.prepare" and c[3] != old_host]
        firsts.append(fence[1])
        olds.append(fence[2])
        new = next((c for c in pushes if c[3] != old_host), None)
        committed += new is not None and new[0] == "records.commit"
        old_rep = fence[2]
        if new is not None:
            seconds.append(new[1])
            news.append(new[2])
            if "t0" in new[2] and "t1" in old_rep:
                gaps["old_to_new"].append(new[2]["t0"] - old_rep["t1"])
            if "pushed" in marks and "t1" in new[2]:
                gaps["new_to_done"].append(marks["pushed"] - new[2]["t1"])
        if "txn" in marks and "t0" in old_rep:
            gaps["to_old"].append(old_rep["t0"] - marks["txn"])
    phase_rows = [
        ("  in the controller (request in -> answer out)", PHASES["server"]),
        ("    CPU time of the controller's thread in it", PHASES["server_cpu"]),
        ("    request in -> transaction starts (HTTP, routing, auth, body)",
         PHASES["before"]),
        ("    controller transaction (incl. any thread hop)", PHASES["txn"]),
        ("      its CPU time (controller's thread)", PHASES["txn_cpu"]),
        ("    pushes, both hosts (wall)", PHASES["push"]),
        ("      transaction done -> push to the old host starts", gaps["to_old"]),
        ("      push to the old host (fence: alone, first)", firsts),
        ("        records.apply in the old host's agent", [a["handled_s"] for a in olds
                                                          if "handled_s" in a]),
        ("          its CPU time", [a["handled_cpu_s"] for a in olds if "handled_cpu_s" in a]),
        ("          of which nft commit", [a["committed_s"] for a in olds
                                          if "committed_s" in a]),
        ("        send -> op starts in the agent", [a["up_s"] for a in olds if "up_s" in a]),
        ("        op ends in the agent -> answer received",
         [a["down_s"] for a in olds if "down_s" in a]),
        ("      prepare on the new host (beside the old host's push)", prepares),
        (f"      push to the new host (after the old one answered; {committed} of "
         f"{len(MOVES)} by commit)", seconds),
        ("        old host answered -> push to the new host starts", gaps["old_to_new"]),
        ("        records.apply in the new host's agent", [a["handled_s"] for a in news
                                                          if "handled_s" in a]),
        ("          its CPU time", [a["handled_cpu_s"] for a in news if "handled_cpu_s" in a]),
        ("          of which nft commit", [a["committed_s"] for a in news
                                          if "committed_s" in a]),
        ("        send -> op starts in the agent", [a["up_s"] for a in news if "up_s" in a]),
        ("        op ends in the agent -> answer received",
         [a["down_s"] for a in news if "down_s" in a]),
        ("      new host answered -> pushes done", gaps["new_to_done"]),
        ("    pushes done -> answer out (answer)", PHASES["after"]),
    ]
    return [
        row("move via API -> applied on both hosts (lean client: aiohttp)", api),
        *(row(name, xs) for name, xs in phase_rows if xs),
        ("CPU time of both agents per move (all their work, off-path too; ms)", "",
         f"{agent_cpu * 1000:.2f}", "", str(2 * rounds + 8)),
        row("move via API -> applied on both hosts (SDK client: httpx)", api_httpx),
        row("  API floor: GET of the record (lean client)", api_get),
        row("  API floor: GET of the record (SDK client: httpx)", api_get_httpx),
        row("records.apply on one agent (HTTP round trip, aiohttp)", direct),
        row("  of which nft commit in the agent", commits, 3),
        row("records.state on one agent (HTTP round trip, no work)", noop),
        row("records.state on one agent (HTTP round trip, after a pause)", noop_paused),
        row("records.apply of nothing on one agent (HTTP round trip, after a pause)", empty),
        row("  of which commit in the agent (plan, nothing to send)", empty_commits, 3),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--profile", metavar="FILE",
                    help="write a cProfile of the controller's thread during the moves")
    args = ap.parse_args()
    if args.profile:
        global _PROFILE
        _PROFILE = cProfile.Profile(time.thread_time)  # CPU time: load-independent
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, nftables)")
    instrument()
    with tempfile.TemporaryDirectory(prefix="ev-remap-") as tmp:
        rows = run(args.rounds, Path(tmp))
    if _PROFILE is not None:
        _PROFILE.dump_stats(args.profile)
    print("| remap of one record (target p50 <= 5 ms) | p10 ms | p50 ms | p99 ms | n |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")


if __name__ == "__main__":
    main()
