"""IPv6 in the dataplane's pure core: the ip6 table's maps, family checks, the unsolicited
neighbour advertisement, conntrack flush targets."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from edgevisor.network.conntrack import FlushTarget, delete_request
from edgevisor.network.dataplane import (
    AppliedRecord,
    DataplaneSettings,
    count_accounts,
    element_lists,
    plan,
    render_batch,
    render_table,
)
from edgevisor.network.garp import na_message, parse_mac
from edgevisor.network.netns import instance_ifname

S = DataplaneSettings(fabric_if="fab0")
M1 = "0x45560001"
L, P = IPv6Address("fd00:ac::5"), IPv6Address("fd00:fab::1:5")


def test_a_local_ipv6_record_goes_to_the_ip6_maps_with_a_128_address_and_an_na() -> None:
    r = AppliedRecord("acme", L, P, "h1", 1)
    b = plan({}, {r.key: r}, host="h1", ids={}, counts={}, settings=S)
    assert set(b.adds) == {"iif_acct6", "iif_zone6", "phys_acct6", "phys_zone6", "acct_if6",
                           "if_addr6", "local_logical6", "out_snat6", "in_dnat6"}
    assert b.adds["in_dnat6"] == [(str(P), str(L))]
    assert b.addr_add == [P] and b.garp == [P]  # garp carries the NA for IPv6
    assert b.route_add == [(instance_ifname("acme", L), L, 1)]
    text = render_batch(b, "edgevisor")
    assert "add element ip6 edgevisor in_dnat6 { fd00:fab::1:5 : fd00:ac::5 }" in text
    assert " ip edgevisor " not in text


def test_a_remote_ipv6_record_and_its_removal_flush_ipv6_conntrack() -> None:
    r = AppliedRecord("acme", L, P, "h2", 1)
    cur = {r.key: r}
    gone = AppliedRecord("acme", L, P, "h2", 2, "released")
    b = plan(cur, {r.key: gone}, host="h1", ids={"acme": 1}, counts=count_accounts(cur, "h1"),
             settings=S)
    assert b.deletes == {"out_dnat6": [f"{M1} . {L}"], "in_snat6": [f"{M1} . {P}"]}
    assert FlushTarget(1, "dst", L) in b.flush and FlushTarget(1, "src", P) in b.flush


def test_mixed_families_render_into_their_own_tables() -> None:
    v4 = AppliedRecord("acme", IPv4Address("10.0.0.5"), IPv4Address("10.250.1.5"), "h1", 1)
    v6 = AppliedRecord("acme", L, P, "h2", 1)
    lists = element_lists({v4.key: v4, v6.key: v6}, "h1", {"acme": 1}, S)
    assert lists["in_dnat"] == ["10.250.1.5 : 10.0.0.5"]
    assert lists["out_dnat6"] == [f"{M1} . {L} : {P}"]
    text = render_table(S, lists)
    assert "table ip edgevisor {" in text and "table ip6 edgevisor {" in text
    assert "add element ip6 edgevisor out_dnat6" in text
    assert "add element ip edgevisor in_dnat" in text
    # Neighbour discovery passes the IPv6 chains untouched; IPv4 has no such rule.
    v6_part = text[text.index("table ip6 edgevisor {"):]
    assert "nd-neighbor-solicit" in v6_part
    assert "nd-neighbor-solicit" not in text[:text.index("table ip6 edgevisor {")]


def test_translation_keeps_the_family() -> None:
    with pytest.raises(ValueError, match="different IP versions"):
        AppliedRecord("acme", L, IPv4Address("10.250.1.5"), "h1", 1)
    # A record that translates nothing may carry any placeholder.
    AppliedRecord("acme", L, IPv4Address("0.0.0.0"), "", 1, "released")


def test_unsolicited_na_has_override_target_and_link_layer_option() -> None:
    mac = parse_mac("02:00:00:00:00:05")
    msg = na_message(mac, P)
    kind, code, csum, flags = struct.unpack_from("!BBHI", msg)
    assert (kind, code, csum) == (136, 0, 0)
    assert flags == 0x20000000  # Override, not Solicited, not Router
    assert msg[8:24] == P.packed
    assert msg[24:] == bytes([2, 1]) + mac  # target link-layer address, 8 bytes
    with pytest.raises(ValueError):
        na_message(b"\x00", P)


def test_conntrack_delete_carries_the_entry_family() -> None:
    req = delete_request(b"", 1, 7, family=10)
    assert req[16] == 10
    assert delete_request(b"", 1, 7)[16] == 2
