"""The netlink element path against the libnftables text path, on real tables.

Two namespaces joined by a veth (each end named ``fab0``, the fabric interface the
dataplane wants) hold the same host's table, made by ``render_table``. Random sequences of
planned batches (IPv4 and IPv6 records, local and remote, remaps, removals, stale fence
adds and deletes, epoch moves) go through the netlink path in one and the text path in the
other; ``nft -j list table`` of both must be equal after every step. A refused batch leaves
the table as it was.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import secrets
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from edgevisor.network.dataplane import (
    AppliedRecord,
    ApplyFailed,
    Dataplane,
    DataplaneSettings,
    Key,
)
from edgevisor.network.netns import create_netns, delete_netns, ip
from edgevisor.network.nft import Nft
from edgevisor.network.nft_netlink import NetlinkBatchError

pytestmark = pytest.mark.root

SETTINGS = DataplaneSettings(fabric_if="fab0")


class Pair:
    """The netlink-path and text-path dataplanes of host ``h1``, one namespace each."""

    def __init__(self) -> None:
        tag = f"evnl{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.names = [f"{tag}-nl", f"{tag}-tx"]
        self.dps: list[Dataplane] = []
        self.nfts: list[Nft] = []
        try:
            for n in self.names:
                create_netns(n)
            ip(
                "link",
                "add",
                "fab0",
                "netns",
                self.names[0],
                "type",
                "veth",
                "peer",
                "name",
                "fab0",
                "netns",
                self.names[1],
            )
            for n in self.names:
                ip("link", "set", "fab0", "up", netns=n)
            self.nl = Dataplane("h1", SETTINGS, netns=self.names[0])
            self.dps.append(self.nl)
            self.tx = Dataplane("h1", SETTINGS, netns=self.names[1], element_path="text")
            self.dps.append(self.tx)
            self.nfts = [Nft(n) for n in self.names]
        except BaseException:
            self.close()
            raise

    def tables(self, i: int) -> list[Any]:
        return [self.nfts[i].query(f"list table {fam} {SETTINGS.table}") for fam in ("ip", "ip6")]

    def close(self) -> None:
        for dp in self.dps:
            dp.close()
        for nft in self.nfts:
            nft.close()
        for n in self.names:
            delete_netns(n)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()  # removes what it made if it fails
    try:
        yield p
    finally:
        p.close()


def _text_forbidden(text: str) -> None:
    raise AssertionError(f"the netlink dataplane used the text path for:\n{text}")


class Records:
    """Random record changes of one host's view; physical addresses never repeat."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.current: dict[Key, AppliedRecord] = {}
        self.gen = 0
        self.n = 0

    def _phys(self, v6: bool) -> IPv4Address | IPv6Address:
        self.n += 1
        if v6:
            return IPv6Address(f"fd00:fab::{self.n:x}")
        return IPv4Address(f"10.250.{self.n >> 8 & 255}.{self.n & 255}")

    def step(self) -> list[AppliedRecord]:
        rng = self.rng
        out: dict[Key, AppliedRecord] = {}
        for _ in range(rng.randint(1, 3)):
            self.gen += 1
            kind = rng.choice(["new", "new", "remap", "remap", "move_phys", "remove"])
            present = sorted(
                (k for k in self.current if k not in out), key=lambda k: (k[0], str(k[1]))
            )
            if kind != "new" and present:
                old = self.current[rng.choice(present)]
                if kind == "remove":
                    rec = AppliedRecord(
                        old.account, old.logical, old.physical, old.host, self.gen, "preserved"
                    )
                else:
                    host = rng.choice(["h1", "h2", "h3"]) if kind == "remap" else old.host
                    rec = AppliedRecord(
                        old.account, old.logical, self._phys(old.v6), host, self.gen
                    )
            else:
                v6 = rng.random() < 0.4
                acct = rng.choice(["acct1", "acct2", "acct3"])
                last = rng.randint(2, 40)
                logical = IPv6Address(f"fd00::{last:x}") if v6 else IPv4Address(f"10.0.0.{last}")
                rec = AppliedRecord(
                    acct, logical, self._phys(v6), rng.choice(["h1", "h2"]), self.gen
                )
            out[rec.key] = rec
        for k, r in out.items():
            if r.state == "active":
                self.current[k] = r
            else:
                self.current.pop(k, None)
        return list(out.values())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_netlink_and_text_paths_make_equal_tables(
    pair: Pair, seed: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for dp in pair.dps:
        dp.rebuild([])
    assert pair.nl._nl is not None  # the netlink socket opened (the kernel acks BATCH_END)
    monkeypatch.setattr(pair.nl, "_run", _text_forbidden)
    rng = random.Random(seed)
    recs = Records(rng)
    moved = fenced = unfenced = 0
    with caplog.at_level(logging.WARNING, logger="edgevisor.network.dataplane"):
        for step in range(30):
            changes = recs.step()
            pendings = [dp.commit(changes) for dp in pair.dps]
            b = pendings[0].batch
            moved += bool(b.flush)  # the epoch moves
            fenced += len(b.stale_add)
            unfenced += len(b.stale_del)
            # The conntrack flush (not run here) succeeds for some commits: their stale
            # elements go with a later batch.
            if rng.random() < 0.6:
                for dp, p in zip(pair.dps, pendings, strict=True):
                    dp.flushed(p)
            assert pair.tables(0) == pair.tables(1), f"seed {seed} step {step}: {changes}"
            assert pair.nl.records == pair.tx.records
    assert not [r for r in caplog.records if "text" in r.getMessage()]
    # The sequence exercised what it should.
    assert moved and fenced and unfenced
    el = pair.nl.table_elements()
    assert any(el.get(n) for n in ("out_dnat", "out_dnat6", "in_dnat", "in_dnat6"))


def test_refused_batch_leaves_the_table_unchanged(pair: Pair) -> None:
    a = AppliedRecord("acct1", IPv4Address("10.0.0.5"), IPv4Address("10.250.1.5"), "h1", 1)
    for dp in pair.dps:
        dp.rebuild([a])
    before = pair.tables(0)
    records_before = dict(pair.nl.records)
    # The dataplane believes in a record the kernel does not hold (state drifted): its
    # removal deletes elements that are not there, in one batch with a valid add.
    ghost = AppliedRecord("acct2", IPv6Address("fd00::9"), IPv6Address("fd00:fab::9"), "h2", 2)
    pair.nl.records[ghost.key] = ghost
    pair.nl.counts["acct2"] = (1, 0)
    pair.nl.ids["acct2"] = 2
    new = AppliedRecord("acct1", IPv4Address("10.0.0.6"), IPv4Address("10.250.1.6"), "h2", 3)
    gone = AppliedRecord("acct2", ghost.logical, ghost.physical, "h2", 4, "preserved")
    with pytest.raises(ApplyFailed) as info:
        pair.nl.apply([new, gone])
    cause = info.value.__cause__
    assert isinstance(cause, NetlinkBatchError) and cause.errno == errno.ENOENT
    assert cause.set_name in ("out_dnat6", "in_snat6") and cause.element is not None
    assert pair.tables(0) == before  # nothing of the batch: the valid add did not apply
    assert pair.nl.records == {**records_before, ghost.key: ghost}  # state did not advance
    assert pair.nl.last_error is not None and "No such file" in pair.nl.last_error
    # The same batch through libnftables is refused too (no partial table there either).
    pair.tx.records[ghost.key] = ghost
    pair.tx.counts["acct2"] = (1, 0)
    pair.tx.ids["acct2"] = 2
    with pytest.raises(ApplyFailed):
        pair.tx.apply([new, gone])
    assert pair.tables(1) == before
    # Once the drift is gone the next batch applies.
    del pair.nl.records[ghost.key], pair.nl.counts["acct2"], pair.nl.ids["acct2"]
    pair.nl.apply([new])
    assert any("10.0.0.6" in str(e) for e in pair.nl.table_elements()["out_dnat"])


def test_unexplained_refusal_is_retried_once_as_text(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for dp in pair.dps:
        dp.rebuild([])
    assert pair.nl._nl is not None
    calls: list[int] = []

    def refuse(batch: Any, **_: Any) -> None:
        calls.append(1)
        raise NetlinkBatchError("refused", errno=errno.EINVAL)

    monkeypatch.setattr(pair.nl._nl, "commit", refuse)
    r = AppliedRecord("acct1", IPv4Address("10.0.0.7"), IPv4Address("10.250.2.7"), "h2", 1)
    with caplog.at_level(logging.WARNING, logger="edgevisor.network.dataplane"):
        pair.nl.apply([r])
    pair.tx.apply([r])
    assert calls == [1]
    assert any("retrying it as text" in m.getMessage() for m in caplog.records)
    assert pair.tables(0) == pair.tables(1)
    # Refused by both: the text path's error, the table unchanged.
    before = pair.tables(0)
    pair.nl.records[(r.account, IPv4Address("10.0.0.8"))] = AppliedRecord(
        "acct1", IPv4Address("10.0.0.8"), IPv4Address("10.250.2.8"), "h2", 2
    )
    with pytest.raises(ApplyFailed) as info:
        pair.nl.apply(
            [
                AppliedRecord(
                    "acct1",
                    IPv4Address("10.0.0.8"),
                    IPv4Address("10.250.2.8"),
                    "h2",
                    3,
                    "preserved",
                )
            ]
        )
    assert calls == [1, 1]
    assert "nftables batch failed" in info.value.message  # NftError of the text path
    assert pair.tables(0) == before


def test_large_batch_is_split_into_messages_of_one_transaction(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5,000 records in one delta: element lists over 64 KiB are split into several
    messages (their attribute length is 16 bits) and the batch over the socket's default
    buffer; still one transaction, equal to the text path's table."""
    for dp in pair.dps:
        dp.rebuild([])
    recs = [
        AppliedRecord(
            f"acct{i % 3}",
            IPv4Address(f"10.1.{i >> 8}.{i & 255}"),
            IPv4Address(f"10.251.{i >> 8}.{i & 255}"),
            "h2",
            i + 1,
        )
        for i in range(5000)
    ]
    monkeypatch.setattr(pair.nl, "_run", _text_forbidden)
    pendings = [dp.commit(recs) for dp in pair.dps]
    assert pendings[0].batch.element_ops == 10_000
    assert pair.tables(0) == pair.tables(1)
    assert len(pair.nl.table_elements()["out_dnat"]) == 5000


def test_rebuild_pauses_the_collector_and_restores_it(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cyclic GC is off while a rebuild renders its table and as it was afterwards,
    also after a refused rebuild."""
    import edgevisor.network.dataplane as dpm

    seen: list[bool] = []
    render = dpm.render_table

    def spy(*args: Any, **kwargs: Any) -> str:
        seen.append(gc.isenabled())
        return render(*args, **kwargs)

    monkeypatch.setattr(dpm, "render_table", spy)
    ok = [AppliedRecord("acct1", IPv4Address("10.0.0.2"), IPv4Address("10.250.0.1"), "h1", 1)]
    clash = [*ok, AppliedRecord("acct1", IPv4Address("10.0.0.3"), IPv4Address("10.250.0.1"),
                                "h1", 2)]  # two local records, one physical address
    was = gc.isenabled()
    try:
        gc.enable()
        pair.nl.rebuild(ok)
        assert seen == [False] and gc.isenabled()
        with pytest.raises(ApplyFailed, match="share a physical"):
            pair.nl.rebuild(clash)
        assert gc.isenabled()
        gc.disable()
        pair.nl.rebuild(ok)
        assert seen == [False, False] and not gc.isenabled()
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()
