"""The hot path's own text conversions equal the slow ones they replace.

:func:`sqlite_timestamp` must produce exactly what :class:`UTCDateTime` binds on SQLite
(string comparisons of stored timestamps order by time only if every writer agrees), and
the hot path's IPv4 formatting must equal ``ipaddress``'s canonical text (the unique key
``(account, logical)`` compares text).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from edgevisor.network.fast_alloc import _Net, sqlite_timestamp
from edgevisor.network.ipam import AddressPool
from edgevisor.store.network_models import UTCDateTime

_DIALECT = sqlite.dialect()
_BIND = UTCDateTime().dialect_impl(_DIALECT).bind_processor(_DIALECT)


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                               timezone(timedelta(hours=-8))])))  # fmt: skip
def test_sqlite_timestamp_is_what_the_column_type_binds(now: datetime) -> None:
    assert _BIND is not None
    assert sqlite_timestamp(now) == _BIND(now)


def test_sqlite_timestamp_keeps_zero_microseconds() -> None:
    assert sqlite_timestamp(datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)) == (
        "2026-05-01 12:00:00.000000")


@pytest.mark.parametrize("cidr", ["10.0.0.0/8", "192.168.7.0/24", "0.0.0.0/30",
                                  "255.255.255.252/30"])  # fmt: skip
def test_ipv4_text_equals_ipaddress(cidr: str) -> None:
    pool = AddressPool.create(cidr)
    net = _Net(pool)
    for offset in {0, 1, 2, 255, 256, pool.size // 2, pool.size - 2, pool.size - 1}:
        if 0 <= offset < pool.size:
            assert net.address(offset) == str(pool.address_at(offset))


def test_ipv6_text_equals_ipaddress() -> None:
    pool = AddressPool.create("fd00:1::/64")
    net = _Net(pool)
    for offset in (0, 1, 2, 0xFFFF, 2**32 + 5, 2**62 - 1):
        assert net.address(offset) == str(pool.address_at(offset))
