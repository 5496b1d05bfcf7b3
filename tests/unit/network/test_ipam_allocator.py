"""The pure IPAM core: pools, reservations, cursor + free-list allocation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevisor.errors import Conflict, RequestError, ResourceExhausted
from edgevisor.network.ipam import (
    AddressPool,
    Allocator,
    IpamSettings,
    PoolExhausted,
    parse_network,
)


def test_ipv4_reserves_network_broadcast_and_first_host_gateway() -> None:
    pool = AddressPool.create("10.1.0.0/29")
    assert pool.gateway == ipaddress.ip_address("10.1.0.1")
    assert pool.reserved == {0, 1, 7}
    alloc = Allocator(pool)
    got = [str(alloc.allocate()) for _ in range(5)]
    assert got == ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
    with pytest.raises(PoolExhausted) as err:
        alloc.allocate()
    assert err.value.details == {
        "pool": "10.1.0.0/29", "cidr": "10.1.0.0/29", "size": 8, "assignable": 5,
    }
    assert "10.1.0.0/29" in err.value.message and "5 assignable of 8" in err.value.message
    assert isinstance(err.value, ResourceExhausted)


def test_explicit_gateway_and_no_gateway() -> None:
    pool = AddressPool.create("192.168.5.0/24", gateway="192.168.5.254", name="lan")
    assert pool.reserved == {0, 254, 255}
    with pytest.raises(RequestError, match="gateway"):
        pool.check_assignable(254)
    bare = AddressPool.create("192.168.5.0/24", gateway=None, reserve_edges=False)
    assert bare.reserved == frozenset() and bare.assignable == 256
    with pytest.raises(RequestError, match="outside"):
        AddressPool.create("192.168.5.0/24", gateway="192.168.6.1")


def test_ipv6_reserves_subnet_router_anycast_and_gateway_only() -> None:
    pool = AddressPool.create("fd00:1::/64")
    assert pool.reserved == {0, 1}
    assert pool.size == 2**64
    alloc = Allocator(pool)
    assert str(alloc.allocate()) == "fd00:1::2"
    # The last address of a /64 is assignable (no broadcast in IPv6).
    assert str(alloc.allocate_specific("fd00:1::ffff:ffff:ffff:ffff")) == (
        "fd00:1::ffff:ffff:ffff:ffff"
    )


def test_specific_request_is_skipped_by_the_cursor_later() -> None:
    alloc = Allocator(AddressPool.create("10.0.0.0/29"))
    alloc.allocate_specific("10.0.0.3")
    assert [str(alloc.allocate()) for _ in range(4)] == [
        "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6",
    ]


def test_bad_requests_name_the_reason() -> None:
    alloc = Allocator(AddressPool.create("10.0.0.0/24"))
    with pytest.raises(RequestError, match=r"outside network 10\.0\.0\.0/24"):
        alloc.allocate_specific("10.0.1.5")
    with pytest.raises(RequestError, match="outside"):
        alloc.allocate_specific("fd00::1")
    with pytest.raises(RequestError, match="invalid address"):
        alloc.allocate_specific("10.0.0.300")
    with pytest.raises(RequestError, match="gateway"):
        alloc.allocate_specific("10.0.0.1")
    with pytest.raises(RequestError, match="reserved"):
        alloc.allocate_specific("10.0.0.255")
    alloc.allocate_specific("10.0.0.9")
    with pytest.raises(Conflict, match="already allocated"):
        alloc.allocate_specific("10.0.0.9")
    alloc.release("10.0.0.9")
    with pytest.raises(Conflict, match="not allocated"):
        alloc.release("10.0.0.9")


def test_free_list_is_fifo_after_the_cursor_runs_out() -> None:
    alloc = Allocator(AddressPool.create("10.0.0.0/29"))
    got = [alloc.allocate() for _ in range(5)]
    alloc.release(got[3])
    alloc.release(got[1])
    assert alloc.allocate() == got[3]
    assert alloc.allocate() == got[1]


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.0.1/24", "host bits set"),
        ("10.0.0.0/33", "invalid CIDR"),
        ("nonsense", "invalid CIDR"),
        ("10.0.0.0/7", "too large"),
        ("10.0.0.0/31", "too small"),
        ("fd00::/40", "too large"),
        ("fd00::/127", "too small"),
    ],
)
def test_parse_network_refuses_bad_or_out_of_bounds_cidrs(cidr: str, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_network(cidr, IpamSettings())


def test_settings_are_frozen_and_strict() -> None:
    s = IpamSettings()
    with pytest.raises(ValueError):
        IpamSettings(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        s.hold_down_s = 1  # type: ignore[misc]


# A program: allocate any / allocate a specific offset / release the k-th address in use.
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("any"), st.integers(0, 0)),
        st.tuples(st.just("specific"), st.integers(0, 63)),
        st.tuples(st.just("release"), st.integers(0, 1000)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, cidr=st.sampled_from(["10.9.8.0/26", "fd00:9::/122"]))
def test_never_hands_out_an_address_twice_and_freed_ones_come_back(
    ops: list[tuple[str, int]], cidr: str
) -> None:
    pool = AddressPool.create(cidr)
    alloc = Allocator(pool)
    held: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for op, arg in ops:
        if op == "any":
            try:
                addr = alloc.allocate()
            except PoolExhausted:
                assert len(held) == pool.assignable
                continue
            assert addr not in held
            assert pool.offset_of(addr) not in pool.reserved
            held.append(addr)
        elif op == "specific":
            addr = pool.address_at(arg)
            if arg in pool.reserved:
                with pytest.raises(RequestError):
                    alloc.allocate_specific(addr)
            elif addr in held:
                with pytest.raises(Conflict):
                    alloc.allocate_specific(addr)
            else:
                assert alloc.allocate_specific(addr) == addr
                held.append(addr)
        elif held:
            alloc.release(held.pop(arg % len(held)))
        assert alloc.available == pool.assignable - len(held)
    # Drain: every address not held comes out exactly once, then the pool is exhausted.
    rest = []
    while True:
        try:
            rest.append(alloc.allocate())
        except PoolExhausted:
            break
    assert len(rest) == len(set(rest))
    assert set(rest).isdisjoint(held)
    everything = {pool.address_at(o) for o in range(pool.size) if o not in pool.reserved}
    assert set(rest) | set(held) == everything
