"""``Dataplane.prepare`` + ``commit(prepared=...)`` on real tables (root, namespaces).

A prepare plans and encodes a delta ahead of its commit and touches nothing; the commit
sends that batch when nothing changed in between, and plans afresh when something did
(another commit, a flush noted, a rebuild). Either way the kernel table must end up the
same as after a plain commit of the same records on a twin host, step after step.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from edgevisor.network.dataplane import AppliedRecord, Dataplane, DataplaneSettings
from edgevisor.network.netns import create_netns, delete_netns, ip

pytestmark = pytest.mark.root

SETTINGS = DataplaneSettings(fabric_if="fab0")


@pytest.fixture
def twins() -> Iterator[tuple[Dataplane, Dataplane]]:
    """Host ``h1``'s dataplane twice, one namespace each (a veth between them, each end
    named ``fab0``): one takes prepared commits, the other plain ones."""
    tag = f"evpc{os.getpid() % 10000}{secrets.token_hex(2)}"
    names = [f"{tag}-a", f"{tag}-b"]
    dps: list[Dataplane] = []
    try:
        for n in names:
            create_netns(n)
        ip(
            "link",
            "add",
            "fab0",
            "netns",
            names[0],
            "type",
            "veth",
            "peer",
            "name",
            "fab0",
            "netns",
            names[1],
        )
        for n in names:
            ip("link", "set", "fab0", "up", netns=n)
            dps.append(Dataplane("h1", SETTINGS, netns=n))
        yield dps[0], dps[1]
    finally:
        for dp in dps:
            dp.close()
        for n in names:
            delete_netns(n)


def rec(logical: str, physical: str, host: str, gen: int) -> AppliedRecord:
    return AppliedRecord("acme", IPv4Address(logical), IPv4Address(physical), host, gen)


def table(dp: Dataplane) -> dict[str, Any]:
    # The epoch map and stale set are compared too: the fence must be identical.
    return {k: sorted(map(repr, v)) for k, v in dp.table_elements().items()}


def test_prepare_touches_nothing(twins: tuple[Dataplane, Dataplane]) -> None:
    dp, _ = twins
    dp.rebuild([rec("10.0.0.5", "10.250.1.5", "h1", 1), rec("10.0.0.7", "10.250.1.7", "h2", 2)])
    before, state = table(dp), (dict(dp.records), dp.epoch, dict(dp.stale), dp.version)
    prepared = dp.prepare([rec("10.0.0.7", "10.250.1.8", "h1", 3)])
    assert prepared is not None and prepared.batch.element_ops > 0
    assert table(dp) == before
    assert (dict(dp.records), dp.epoch, dict(dp.stale), dp.version) == state


def test_prepared_commits_match_plain_ones(twins: tuple[Dataplane, Dataplane]) -> None:
    dp, plain = twins
    start = [rec("10.0.0.5", "10.250.1.5", "h1", 1), rec("10.0.0.7", "10.250.1.7", "h2", 2)]
    for d in (dp, plain):
        d.rebuild(start)
    gen = 3
    used = 0
    for k in range(12):
        # The record moves between this host and others (local <-> remote), new physicals.
        moved = [rec("10.0.0.7", f"10.250.1.{20 + k}", "h1" if k % 2 else f"h{2 + k % 3}", gen)]
        gen += 1
        prepared = dp.prepare(moved)
        assert prepared is not None
        if k % 4 == 3:
            # Something changes in between: a commit of another record (or, below, a
            # flush noted): the prepared batch is stale and must be planned again.
            other = [rec("10.0.0.9", f"10.250.2.{k}", "h3", gen)]
            gen += 1
            for d in (dp, plain):
                d.finish(d.commit(other))
        pending = dp.commit(moved, prepared=prepared)
        used += pending.batch is prepared.batch
        assert (pending.batch is prepared.batch) == (k % 4 != 3)
        plain_pending = plain.commit(moved)
        # Links and conntrack cleanup (flushed() changes the next plan: stale elements go).
        dp.finish(pending)
        plain.finish(plain_pending)
        assert table(dp) == table(plain), k
        assert dp.records == plain.records and dp.epoch == plain.epoch
    assert used == 9


def test_prepared_batch_of_other_records_is_not_sent(twins: tuple[Dataplane, Dataplane]) -> None:
    dp, plain = twins
    start = [rec("10.0.0.5", "10.250.1.5", "h1", 1)]
    for d in (dp, plain):
        d.rebuild(start)
    prepared = dp.prepare([rec("10.0.0.5", "10.250.1.6", "h1", 2)])
    assert prepared is not None
    actual = [rec("10.0.0.5", "10.250.1.7", "h2", 3)]  # a newer push overtook it
    pending = dp.commit(actual, prepared=prepared)
    assert pending.batch is not prepared.batch
    dp.finish(pending)
    plain.finish(plain.commit(actual))
    assert table(dp) == table(plain)
