"""The hot set's pure parts: range planning, ext4 geometry, the payload the target takes."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st

from edgevisor.migration.domain_hot import (
    extent_start,
    groups_from_payload,
    inode_offset,
    parse_ext4_geometry,
    plan_ranges,
)

KiB = 1024


def superblock(
    *,
    log_bs: int = 2,
    ipg: int = 8192,
    inode_size: int = 256,
    desc_size: int = 64,
    bit64: bool = True,
    first_data_block: int = 0,
) -> bytes:
    sb = bytearray(1024)
    struct.pack_into("<II", sb, 0x14, first_data_block, log_bs)
    struct.pack_into("<I", sb, 0x28, ipg)
    struct.pack_into("<H", sb, 0x38, 0xEF53)
    struct.pack_into("<H", sb, 0x58, inode_size)
    struct.pack_into("<I", sb, 0x60, 0x80 if bit64 else 0)
    struct.pack_into("<H", sb, 0xFE, desc_size)
    return bytes(sb)


def test_plan_aligns_merges_and_keeps_group_order() -> None:
    groups = plan_ranges([[(100, 10), (4096, 1)], [(0, 8192), (20000, 5000)]], 1 << 20)
    # the first group takes [0, 8192) (two 4 KiB pages, merged); the second only the rest
    assert groups == [[(0, 8192)], [(16384, 12288)]]


def test_plan_caps_the_total_earlier_groups_first() -> None:
    groups = plan_ranges([[(0, 8192)], [(65536, 65536)]], 12288)
    assert groups == [[(0, 8192)], [(65536, 4096)]]
    assert plan_ranges([[(0, 8192)], [(65536, 4096)]], 8192) == [[(0, 8192)]]


def test_plan_drops_empty_ranges_and_groups() -> None:
    assert plan_ranges([[(0, 0)], [], [(8192, 1)]], 1 << 20) == [[(8192, 4096)]]


@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(0, 1 << 18)), max_size=8),
        max_size=4,
    ),
    st.integers(0, 1 << 22),
)
def test_plan_properties(groups: list[list[tuple[int, int]]], cap: int) -> None:
    out = plan_ranges(groups, cap)
    flat = sorted(r for g in out for r in g)
    assert sum(n for _o, n in flat) <= cap
    for (o1, n1), (o2, _n2) in itertools.pairwise(flat):
        assert o1 + n1 <= o2  # no byte asked twice
    for o, n in flat:
        assert o % 4096 == 0 and n > 0
        # every byte planned was asked for by some input range (after alignment)
        assert any(r[1] > 0 and r[0] - r[0] % 4096 <= o < r[0] + r[1] for g in groups for r in g)


def test_geometry_and_inode_offset_64bit() -> None:
    geo = parse_ext4_geometry(superblock())
    assert geo is not None
    assert (geo.block_size, geo.inodes_per_group, geo.inode_size) == (4096, 8192, 256)
    assert geo.gdt_offset == 4096  # block 1
    desc = bytearray(64)
    struct.pack_into("<I", desc, 0x8, 0x1234)
    struct.pack_into("<I", desc, 0x28, 1)
    # inode 2 is the second of its group's table (table at block 0x1_0000_1234)
    assert inode_offset(geo, 2, bytes(desc)) == (1 << 32 | 0x1234) * 4096 + 256
    assert inode_offset(geo, 8192 + 1, bytes(desc)) == (1 << 32 | 0x1234) * 4096


def test_geometry_of_a_1k_block_filesystem_without_64bit() -> None:
    geo = parse_ext4_geometry(superblock(log_bs=0, desc_size=0, bit64=False,
                                         first_data_block=1, inode_size=128))  # fmt: skip
    assert geo is not None
    assert (geo.block_size, geo.desc_size, geo.gdt_offset) == (1024, 32, 2048)
    desc = bytearray(32)
    struct.pack_into("<I", desc, 0x8, 300)
    assert inode_offset(geo, 12, bytes(desc)) == 300 * 1024 + 11 * 128


def test_not_ext4_is_none() -> None:
    assert parse_ext4_geometry(bytes(1024)) is None
    assert parse_ext4_geometry(b"short") is None


def test_extent_start_of_a_leaf_and_not_of_an_index() -> None:
    geo = parse_ext4_geometry(superblock())
    assert geo is not None
    inode = bytearray(256)
    struct.pack_into("<HHHH", inode, 0x28, 0xF30A, 1, 4, 0)
    struct.pack_into("<IHHI", inode, 0x28 + 12, 0, 8, 0, 1066)
    assert extent_start(geo, bytes(inode)) == 1066 * 4096
    struct.pack_into("<HHHH", inode, 0x28, 0xF30A, 1, 4, 1)  # depth 1: an index node
    assert extent_start(geo, bytes(inode)) is None
    assert extent_start(geo, bytes(256)) is None  # no extent header (block map)


def _groups(raw: object) -> list[list[tuple[int, int]]]:
    return groups_from_payload(raw, 4096)


def test_prefetch_payload_is_checked_and_malformed_parts_dropped() -> None:
    assert groups_from_payload([[[0, 1], [1, 1], [2, 1]], [[3, 1]]], 2) == [[(0, 1), (1, 1)]]
    assert _groups([[[0, 4096], [8192, 4096]], [[65536, 1]]]) == [
        [(0, 4096), (8192, 4096)],
        [(65536, 1)],
    ]
    assert _groups(None) == []
    assert _groups("x") == []
    assert _groups([[[0, 0], [-1, 5], ["a", 1], [1]], "x", [[4096, 4096]]]) == [[(4096, 4096)]]
