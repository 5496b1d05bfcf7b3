"""Benchmark of the host dataplane (root; network namespaces only).

Measures, in one run:
- applying a table of N records (default 100,000) from scratch (one transaction),
- a one-record remap applied on a host holding that table (p50/p95): to commit (new
  connections use the new mapping, and flows opened to the old one are dropped: the
  stale-epoch fence is in the same transaction), and with the conntrack cleanup of the
  fenced flows that follows off the critical path; the commit as one raw nf_tables
  netlink batch (the agent's path) against the same batch as libnftables text,
- TCP connects/s between two instances on two hosts through the translation, against two
  namespaces joined by a plain veth pair without translation (ratio).

Usage: ``.venv/bin/python bench/addresses/dataplane.py [--records 100000]``; prints a
markdown table. Every namespace it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import threading
import time
from ipaddress import IPv4Address

from edgevisor.network.dataplane import AppliedRecord, Dataplane, DataplaneSettings
from edgevisor.network.netns import Fabric, call_in, create_netns, ip

SETTINGS = DataplaneSettings(fabric_if="fab0")


def records(n: int, accounts: int = 10, local: int = 100) -> list[AppliedRecord]:
    out = []
    for i in range(n):
        acct = f"acct{i % accounts}"
        logical = IPv4Address(int(IPv4Address("10.0.0.0")) + i // accounts + 2)
        physical = IPv4Address(int(IPv4Address("10.128.0.0")) + i)
        host = "h1" if i < local else f"h{2 + i % 50}"
        out.append(AppliedRecord(acct, logical, physical, host, i + 1))
    return out


def _remap_times(dp: Dataplane, target: AppliedRecord, k: int, gen: int) -> tuple[float, float]:
    moved = AppliedRecord(target.account, target.logical,
                          IPv4Address(int(IPv4Address("10.200.0.0")) + k),
                          f"h{60 + k % 3}", gen)  # fmt: skip
    t0 = time.perf_counter()
    r = dp.apply([moved])
    return time.perf_counter() - t0, r.committed_s


def bench_tables(fabric: Fabric, n: int, remaps: int) -> dict[str, float]:
    """The table from scratch, then remaps on it: element batches as raw netlink (what the
    agent runs) and, on a second host with the same table, as libnftables text (the
    baseline), interleaved."""
    dp = Dataplane("h1", SETTINGS, netns=fabric.add_host(1))
    text = Dataplane("h1", SETTINGS, netns=fabric.add_host(9), element_path="text")
    try:
        recs = records(n)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        res = dp.rebuild(recs)
        full_s = time.perf_counter() - t0
        full_cpu_s = time.thread_time() - c0
        t0 = time.perf_counter()
        dp.rebuild(recs)
        again_s = time.perf_counter() - t0
        assert res.generation == n
        text.rebuild(recs)
        target = recs[n // 2]
        times, commits, text_commits = [], [], []
        gen = n
        for k in range(remaps):
            gen += 1
            took, committed = _remap_times(dp, target, k, gen)
            times.append(took)
            commits.append(committed)
            text_commits.append(_remap_times(text, target, k, gen)[1])
        times.sort()
        commits.sort()
        text_commits.sort()
        return {
            "full_commit_s": res.committed_s,
            "commit_p50_ms": statistics.median(commits) * 1000,
            "commit_p95_ms": commits[int(len(commits) * 0.95) - 1] * 1000,
            "text_p50_ms": statistics.median(text_commits) * 1000,
            "text_p95_ms": text_commits[int(len(text_commits) * 0.95) - 1] * 1000,
            "full_s": full_s,
            "full_cpu_s": full_cpu_s,
            "again_s": again_s,
            "remap_p50_ms": statistics.median(times) * 1000,
            "remap_p95_ms": times[int(len(times) * 0.95) - 1] * 1000,
        }
    finally:
        dp.close()
        text.close()


def _server(netns: str, addr: str, stop: threading.Event) -> socket.socket:
    def listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 7100))
        s.listen(512)
        s.settimeout(0.2)
        return s

    srv = call_in(netns, listen)

    def loop() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except (TimeoutError, OSError):
                continue

    threading.Thread(target=loop, daemon=True).start()
    return srv


def connects_per_s(client_ns: str, dst: str, seconds: float) -> float:
    def run() -> float:
        n = 0
        end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < end:
            s = socket.create_connection((dst, 7100), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
            n += 1
        return n / (time.perf_counter() - t0)

    return call_in(client_ns, run)


def bench_connects(fabric: Fabric, seconds: float) -> dict[str, float]:
    fabric.add_host(2)
    fabric.add_host(3)
    recs = [
        AppliedRecord("acct1", IPv4Address("10.0.0.5"), IPv4Address("10.250.1.5"), "h2", 1),
        AppliedRecord("acct1", IPv4Address("10.0.0.7"), IPv4Address("10.250.1.7"), "h3", 2),
    ]
    a = fabric.add_instance("a", 2, "acct1", IPv4Address("10.0.0.5"))
    b = fabric.add_instance("b", 3, "acct1", IPv4Address("10.0.0.7"))
    dps = [Dataplane(f"h{i}", SETTINGS, netns=fabric.host_ns(i)) for i in (2, 3)]
    stop = threading.Event()
    try:
        for dp in dps:
            dp.rebuild(recs)
        srv = _server(b.netns, "0.0.0.0", stop)
        # Baseline: two namespaces on a plain veth pair, no nftables.
        p, q = f"{fabric.prefix}-pa", f"{fabric.prefix}-pb"
        create_netns(p)
        fabric.namespaces.append(p)
        create_netns(q)
        fabric.namespaces.append(q)
        ip("link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", q, netns=p)
        ip("addr", "add", "10.9.0.1/24", "dev", "v0", netns=p)
        ip("addr", "add", "10.9.0.2/24", "dev", "v1", netns=q)
        ip("link", "set", "v0", "up", netns=p)
        ip("link", "set", "v1", "up", netns=q)
        srv2 = _server(q, "0.0.0.0", stop)
        # Interleaved rounds, medians: the machine is shared and its load drifts.
        translated, plain = [], []
        for _ in range(3):
            plain.append(connects_per_s(p, "10.9.0.2", seconds / 3))
            translated.append(connects_per_s(a.netns, "10.0.0.7", seconds / 3))
        srv.close()
        srv2.close()
        return {"translated": statistics.median(translated), "plain": statistics.median(plain)}
    finally:
        stop.set()
        for dp in dps:
            dp.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--remaps", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    fabric = Fabric(f"evb{os.getpid() % 10000}{secrets.token_hex(2)}")
    try:
        t = bench_tables(fabric, args.records, args.remaps)
        c = bench_connects(fabric, args.seconds)
    finally:
        fabric.destroy()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| apply {args.records:,} records from scratch (one transaction), to commit | "
          f"{t['full_commit_s']:.2f} s | <= 2 s |")
    print(f"| same, incl. address/route/rule resync | {t['full_s']:.2f} s | |")
    print(f"| same, CPU time of the applying thread (load-independent) "
          f"| {t['full_cpu_s']:.2f} s | |")
    print(f"| rebuild over an existing {args.records:,}-record table | {t['again_s']:.2f} s | |")
    print(f"| remap of one record on a host with that table: translation committed and "
          f"old flows fenced (one transaction), p50 | {t['commit_p50_ms']:.2f} ms | <= 5 ms |")
    print(f"| same, p95 | {t['commit_p95_ms']:.2f} ms | |")
    print(f"| same through libnftables text (baseline, same table, interleaved), p50 / p95 | "
          f"{t['text_p50_ms']:.2f} / {t['text_p95_ms']:.2f} ms "
          f"(netlink / text = {t['commit_p50_ms'] / t['text_p50_ms']:.2f}) | |")
    print(f"| remap incl. links and conntrack cleanup of the fenced flows, p50 | "
          f"{t['remap_p50_ms']:.2f} ms | |")
    print(f"| same, p95 | {t['remap_p95_ms']:.2f} ms | |")
    print(f"| TCP connects/s through translation (2 hosts, median of 3) "
          f"| {c['translated']:.0f} | |")
    print(f"| TCP connects/s plain veth, no translation | {c['plain']:.0f} | |")
    print(f"| ratio translated / plain | {c['translated'] / c['plain']:.2f} | |")


if __name__ == "__main__":
    main()
