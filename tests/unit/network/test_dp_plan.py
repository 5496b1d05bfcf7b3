"""Unit tests of the dataplane's pure planning core."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from edgevisor.network.conntrack import FlushTarget, flush_targets
from edgevisor.network.dataplane import (
    AppliedRecord,
    Batch,
    DataplaneSettings,
    Key,
    StaleElem,
    assign_ids,
    count_accounts,
    plan,
    render_batch,
)
from edgevisor.network.garp import garp_frame, parse_mac
from edgevisor.network.netns import instance_ifname

A = IPv4Address
S = DataplaneSettings(fabric_if="fab0")
M1 = "0x45560001"


def rec(account: str, logical: str, physical: str, host: str, gen: int,
        state: str = "active") -> AppliedRecord:
    return AppliedRecord(account, A(logical), A(physical), host, gen, state)  # type: ignore[arg-type]


def apply_plan(current: dict[Key, AppliedRecord], ids: dict[str, int],
               changes: dict[Key, AppliedRecord | None], host: str = "h1") -> Batch:
    return plan(current, changes, host=host, ids=ids, counts=count_accounts(current, host),
                settings=S)


def test_local_record_adds_its_elements_address_route_rule_and_garp() -> None:
    r = rec("acct1", "10.0.0.5", "10.250.1.5", "h1", 1)
    b = apply_plan({}, {}, {r.key: r})
    ifn = f'"{instance_ifname("acct1", A("10.0.0.5"))}"'
    assert b.ids == {"acct1": 1}
    assert b.deletes == {}
    assert dict(b.adds["out_snat"]) == {f"{M1} . 10.0.0.5": "10.250.1.5"}
    assert dict(b.adds["in_dnat"]) == {"10.250.1.5": "10.0.0.5"}
    assert dict(b.adds["iif_acct"]) == {ifn: M1}
    assert "out_dnat" not in b.adds
    assert b.addr_add == [A("10.250.1.5")] and b.garp == [A("10.250.1.5")]
    assert b.rule_add == [1]
    assert b.route_add == [(ifn.strip('"'), A("10.0.0.5"), 1)]
    assert b.flush == set()
    assert b.generation == 1


def test_remote_record_only_translation_maps() -> None:
    r = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 3)
    b = apply_plan({}, {}, {r.key: r})
    assert set(b.adds) == {"out_dnat", "in_snat"}
    assert dict(b.adds["out_dnat"]) == {f"{M1} . 10.0.0.7": "10.250.1.7"}
    assert dict(b.adds["in_snat"]) == {f"{M1} . 10.250.1.7": "10.0.0.7"}
    assert b.addr_add == [] and b.rule_add == [] and b.garp == []


def test_remap_of_remote_record_replaces_exact_elements_and_flushes_old_mapping() -> None:
    old = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 3)
    local = rec("acct1", "10.0.0.5", "10.250.1.5", "h1", 1)
    cur = {old.key: old, local.key: local}
    new = rec("acct1", "10.0.0.7", "10.250.3.7", "h3", 4)
    b = apply_plan(cur, {"acct1": 1}, {new.key: new})
    assert b.deletes == {"out_dnat": [f"{M1} . 10.0.0.7"], "in_snat": [f"{M1} . 10.250.1.7"]}
    assert b.adds == {"out_dnat": [(f"{M1} . 10.0.0.7", "10.250.3.7")],
                      "in_snat": [(f"{M1} . 10.250.3.7", "10.0.0.7")]}
    assert b.element_ops == 4
    assert b.flush == flush_targets(1, A("10.0.0.7"), A("10.250.1.7"))
    assert FlushTarget(1, "dst", A("10.0.0.7")) in b.flush
    assert b.addr_add == b.addr_del == [] and b.rule_add == b.rule_del == []
    text = render_batch(b, "edgevisor")
    assert text.index("delete element") < text.index("add element")
    # 4 map lines and the fence of the old mapping's flows: both keys move to phase 1
    # (bit a) and their phase-0 flows are stale (hash sets, no interval, no epoch).
    assert text.count("\n") == 4 + 2
    assert ("add element ip edgevisor stale { 1 . 10.0.0.7 . 0x00000000, "
            "1 . 10.250.1.7 . 0x00000000 }") in text
    assert "add element ip edgevisor phase_a { 1 . 10.0.0.7, 1 . 10.250.1.7 }" in text
    assert "epoch" not in text
    assert b.epoch == 2 and b.refence == []
    assert b.phase_moves == {(1, A("10.0.0.7")): (0, 1), (1, A("10.250.1.7")): (0, 1)}


def test_fence_moves_phases_and_drops_cleaned_stale_elements() -> None:
    old = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 3)
    cur = {old.key: old}
    new = rec("acct1", "10.0.0.7", "10.250.3.7", "h3", 4)
    k7, k9, k8 = (1, A("10.0.0.7")), (1, A("10.9.9.9")), (1, A("10.8.8.8"))
    # 10.0.0.7 was fenced once (now phase 1, its phase 0 stale and cleaned); 10.9.9.9's
    # stale phase 2 is cleaned, 10.8.8.8's phase 0 not.
    stale: set[StaleElem] = {(k7, 0), (k9, 2), (k8, 0)}
    b = plan(cur, {new.key: new}, host="h1", ids={"acct1": 1},
             counts=count_accounts(cur, "h1"), settings=S, epoch=7, stale=stale,
             stale_done={(k9, 2), (k7, 0)}, phase={k7: 1, k9: 3})
    assert b.epoch == 8
    # Each key's flows of its phase so far are stale; the key moves on.
    assert b.stale_add == [(k7, 1), ((1, A("10.250.1.7")), 0)]
    assert b.phase_moves == {k7: (1, 2), (1, A("10.250.1.7")): (0, 1)}
    # Cleaned elements go; one whose cleanup is not done (10.8.8.8) stays.
    assert sorted(b.stale_del, key=str) == sorted([(k7, 0), (k9, 2)], key=str)
    assert b.refence == []
    text = render_batch(b, "edgevisor")
    # Phase 1 -> 2: 10.0.0.7 leaves phase_a and enters phase_b.
    assert "delete element ip edgevisor phase_a { 1 . 10.0.0.7 }" in text
    assert "add element ip edgevisor phase_b { 1 . 10.0.0.7 }" in text
    assert "add element ip edgevisor phase_a { 1 . 10.250.1.7 }" in text
    # A stale phase shows where each side keeps it: bits 28-29 (source), 30-31 (dest).
    assert ("add element ip edgevisor stale { 1 . 10.0.0.7 . 0x10000000, "
            "1 . 10.0.0.7 . 0x40000000, 1 . 10.250.1.7 . 0x00000000 }") in text
    assert text.index("delete element ip edgevisor stale {") < text.index(
        "add element ip edgevisor stale {")
    assert "1 . 10.9.9.9 . 0x20000000, 1 . 10.9.9.9 . 0x80000000" in text


def test_a_key_back_to_a_phase_not_yet_cleaned_asks_for_that_cleanup_first() -> None:
    """Four phases: a key fenced a fourth time before any cleanup returns to the phase of
    its first fence, whose flows must be gone first (``refence``)."""
    old = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 3)
    new = rec("acct1", "10.0.0.7", "10.250.3.7", "h3", 4)
    k7 = (1, A("10.0.0.7"))

    def fence(stale: set[StaleElem], phase: int) -> Batch:
        return plan({old.key: old}, {new.key: new}, host="h1", ids={"acct1": 1},
                    counts=count_accounts({old.key: old}, "h1"), settings=S, epoch=2,
                    stale=stale, phase={k7: phase})

    b = fence({(k7, 0), (k7, 1)}, 2)
    assert b.refence == [] and (k7, 2) in b.stale_add and b.phase_moves[k7] == (2, 3)
    b = fence({(k7, 0), (k7, 1), (k7, 2)}, 3)
    assert b.refence == [(k7, 0)] and (k7, 0) in b.stale_del
    assert (k7, 3) in b.stale_add and b.phase_moves[k7] == (3, 0)


def test_a_change_without_old_mapping_keeps_the_fence() -> None:
    r = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 3)
    b = plan({}, {r.key: r}, host="h1", ids={}, counts={}, settings=S, epoch=5)
    assert b.epoch == 5 and b.stale_add == [] and b.phase_moves == {}
    text = render_batch(b, "t")
    assert "stale" not in text and "phase" not in text


def test_record_moving_here_gets_address_and_garp_moving_away_loses_them() -> None:
    r = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 3)
    here = rec("acct1", "10.0.0.7", "10.250.1.7", "h1", 4)
    b = apply_plan({r.key: r}, {"acct1": 1}, {here.key: here})
    assert b.addr_add == [A("10.250.1.7")] and b.garp == [A("10.250.1.7")]
    assert b.rule_add == [1]
    assert b.flush  # old flows towards the remote mapping go
    back = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 5)
    b2 = apply_plan({here.key: here}, {"acct1": 1}, {here.key: back})
    assert b2.addr_del == [A("10.250.1.7")] and b2.garp == []
    assert b2.rule_del == [1]
    assert b2.route_del == [(A("10.0.0.7"), 1)]


def test_preserved_record_removes_mapping_and_unchanged_record_is_a_noop() -> None:
    r = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 3)
    same = apply_plan({r.key: r}, {"acct1": 1}, {r.key: r})
    assert same.element_ops == 0 and same.flush == set()
    gone = apply_plan({r.key: r}, {"acct1": 1},
                      {r.key: rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 4, "preserved")})
    assert set(gone.deletes) == {"out_dnat", "in_snat"} and gone.adds == {}
    assert gone.updates == {r.key: None}
    assert gone.ids == {}  # the account has no record left here
    assert gone.generation == 4  # the removal's record generation counts as applied


def test_overlapping_accounts_get_distinct_marks() -> None:
    r1 = rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 1)
    r2 = rec("acct2", "10.0.0.7", "10.250.2.7", "h2", 2)
    b = apply_plan({}, {}, {r1.key: r1, r2.key: r2})
    keys = {k for k, _ in b.adds["out_dnat"]}
    assert keys == {f"{M1} . 10.0.0.7", "0x45560002 . 10.0.0.7"}


def test_two_local_records_with_one_physical_are_refused() -> None:
    r1 = rec("acct1", "10.0.0.5", "10.250.1.5", "h1", 1)
    r2 = rec("acct1", "10.0.0.6", "10.250.1.5", "h1", 2)
    with pytest.raises(ValueError, match=r"10\.250\.1\.5"):
        apply_plan({}, {}, {r1.key: r1, r2.key: r2})


def test_assign_ids_keeps_present_and_reuses_lowest_free() -> None:
    assert assign_ids({"a": 1, "b": 2, "c": 3}, ["a", "c", "d"]) == {"a": 1, "c": 3, "d": 2}
    assert assign_ids({}, ["z", "y"]) == {"y": 1, "z": 2}


def test_garp_frame_is_a_broadcast_request_with_sender_equal_target() -> None:
    mac = parse_mac("02:00:00:00:00:01")
    f = garp_frame(mac, A("10.250.1.7"))
    assert len(f) == 42
    assert f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x08\x06"
    assert f[20:22] == b"\x00\x01"  # request
    assert f[28:32] == f[38:42] == A("10.250.1.7").packed


def test_ipv6_records_are_refused_for_now() -> None:
    from ipaddress import IPv6Address

    with pytest.raises(ValueError):
        AppliedRecord("a", IPv6Address("fd00::1"), A("10.250.1.1"), "h1", 1)  # type: ignore[arg-type]


def test_rebuild_elements_equal_the_planned_elements_of_the_same_records() -> None:
    from edgevisor.network.dataplane import element_lists

    recs = [
        rec("acct1", "10.0.0.5", "10.250.1.5", "h1", 1),
        rec("acct1", "10.0.0.7", "10.250.1.7", "h2", 2),
        rec("acct2", "10.0.0.7", "10.250.2.7", "h1", 3),
        rec("acct2", "10.0.0.9", "10.250.2.9", "h3", 4),
    ]
    current = {r.key: r for r in recs}
    planned = apply_plan({}, {}, dict(current))
    as_lists = {name: sorted(k if v is None else f"{k} : {v}" for k, v in items)
                for name, items in planned.adds.items()}
    rebuilt = element_lists(current, "h1", planned.ids, S)
    assert {k: sorted(v) for k, v in rebuilt.items()} == as_lists
