"""Regression tests of bugs found while building the netlink element path."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from edgevisor.network.dataplane import AppliedRecord, DataplaneSettings, count_accounts, plan

S = DataplaneSettings(fabric_if="fab0")


def test_plan_fences_ipv4_and_ipv6_of_one_account_in_one_batch() -> None:
    """plan() sorted the batch's conntrack flush targets by (zone, side, address): an IPv4
    and an IPv6 remap of one account in one batch raised TypeError (addresses of two
    versions do not compare) instead of planning the fence."""
    v4 = AppliedRecord("acct1", IPv4Address("10.0.0.5"), IPv4Address("10.250.1.5"), "h1", 1)
    v6 = AppliedRecord("acct1", IPv6Address("fd00::5"), IPv6Address("fd00:fab::5"), "h1", 2)
    current = {v4.key: v4, v6.key: v6}
    moved4 = AppliedRecord("acct1", v4.logical, IPv4Address("10.250.2.5"), "h2", 3)
    moved6 = AppliedRecord("acct1", v6.logical, IPv6Address("fd00:fab::6"), "h2", 4)
    b = plan(
        current,
        {moved4.key: moved4, moved6.key: moved6},
        host="h1",
        ids={"acct1": 1},
        counts=count_accounts(current, "h1"),
        settings=S,
        epoch=3,
    )
    assert b.epoch == 4
    assert sorted(b.stale_add, key=str) == sorted(
        [((1, v4.logical), 0), ((1, v4.physical), 0), ((1, v6.logical), 0),
         ((1, v6.physical), 0)], key=str)
