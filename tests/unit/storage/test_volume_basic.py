"""Volume and bitmap behaviour: I/O, sync state, persistence, corruption and repair."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevisor.errors import AlreadyExists, ConfigError, NotFound
from edgevisor.storage.bitmap import Bitmap, StateCorrupt
from edgevisor.storage.blockdev import BlockDevice, OutOfRange
from edgevisor.storage.volume import Volume

BS = 4096


@pytest.fixture
def vol(tmp_path: Path) -> Volume:
    v = Volume.create(tmp_path / "v", 16 * BS + 100, BS)
    yield v
    v.close()


def test_volume_satisfies_blockdevice_protocol(vol: Volume) -> None:
    dev: BlockDevice = vol
    assert dev.size_bytes == 16 * BS + 100
    assert dev.block_size == BS


async def test_write_read_roundtrip_unaligned(vol: Volume) -> None:
    await vol.write(BS - 3, b"hello world")
    assert await vol.read(BS - 3, 11) == b"hello world"
    assert await vol.read(0, 4) == b"\0" * 4
    # the short last block
    await vol.write(vol.size_bytes - 5, b"12345")
    assert await vol.read(vol.size_bytes - 5, 5) == b"12345"


@pytest.mark.parametrize(("off", "length"), [(-1, 1), (0, 16 * BS + 101), (16 * BS + 100, 1)])
async def test_out_of_range_is_rejected_and_nothing_written(
    vol: Volume, off: int, length: int
) -> None:
    with pytest.raises(OutOfRange):
        await vol.write(off, b"x" * length)
    with pytest.raises(OutOfRange):
        await vol.read(off, length)
    assert os.stat(vol.data_path).st_size == vol.size_bytes


async def test_write_zeroes_and_trim_read_back_zero(vol: Volume) -> None:
    await vol.write(0, b"\xaa" * (4 * BS))
    await vol.write_zeroes(100, 2 * BS)
    got = await vol.read(0, 4 * BS)
    assert got[:100] == b"\xaa" * 100
    assert got[100 : 100 + 2 * BS] == bytes(2 * BS)
    assert got[100 + 2 * BS :] == b"\xaa" * (2 * BS - 100)
    await vol.trim(0, 4 * BS)
    assert await vol.read(0, 4 * BS) == bytes(4 * BS)


async def test_allocated_reports_holes_and_data(vol: Volume) -> None:
    await vol.write(2 * BS, b"\x01" * BS)
    await vol.flush()
    ext = vol.allocated(0, 8 * BS)
    assert sum(n for _, n, _ in ext) == 8 * BS
    data = [(o, n) for o, n, d in ext if d]
    assert any(o <= 2 * BS and o + n >= 3 * BS for o, n in data)
    assert not any(o + n > 3 * BS + BS and o < 4 * BS for o, n in data if o >= 4 * BS)


def test_create_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Volume.create(tmp_path / "a", 0)
    with pytest.raises(ConfigError):
        Volume.create(tmp_path / "b", 1 << 20, 3000)
    Volume.create(tmp_path / "c", 1 << 20).close()
    with pytest.raises(AlreadyExists):
        Volume.create(tmp_path / "c", 1 << 20)
    with pytest.raises(NotFound):
        Volume.open(tmp_path / "nothing")


async def test_missing_blocks_and_mark_present_persist(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "lazy", 8 * BS, BS, present=False)
    assert v.missing_blocks() == list(range(8))
    v.mark_present(BS, 2 * BS)
    await v.write(5 * BS + 1, b"partial")  # partial block stays missing
    await v.write(6 * BS, b"x" * BS)  # full block becomes present
    assert v.missing_blocks() == [0, 3, 4, 5, 7]
    assert v.present(0, 3 * BS) == [(0, BS, False), (BS, 2 * BS, True)]
    v.close()
    v2 = Volume.open(tmp_path / "lazy")
    assert v2.missing_blocks() == [0, 3, 4, 5, 7]
    v2.close()


async def test_present_marks_not_durable_before_flush(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "l", 8 * BS, BS, present=False)
    await v.write(0, b"y" * BS)
    # A second opener sees only durable state: not yet present.
    peek = Volume.open(tmp_path / "l")
    assert 0 in peek.missing_blocks()
    os.close(peek._fd)
    peek._store.close()
    await v.flush()
    peek = Volume.open(tmp_path / "l")
    assert 0 not in peek.missing_blocks()
    os.close(peek._fd)
    peek._store.close()
    v.close()


async def test_written_since_mark(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "w", 8 * BS, BS)
    assert v.written_since_mark() == list(range(8))  # untracked: everything
    await v.set_mark()
    assert v.written_since_mark() == []
    await v.write(BS + 10, b"abc")
    await v.write_zeroes(5 * BS, 2 * BS)
    assert v.written_since_mark() == [1, 5, 6]
    # intent is durable immediately, even without flush
    os.close(v._fd)
    v._store.close()
    v2 = Volume.open(tmp_path / "w")
    assert v2.written_since_mark() == [1, 5, 6]
    await v2.set_mark()
    assert v2.written_since_mark() == []
    v2.close()


async def test_checksum_is_sha256_of_content(vol: Volume) -> None:
    await vol.write(123, b"content")
    expected = hashlib.sha256(vol.data_path.read_bytes()).hexdigest()
    assert await vol.checksum() == expected


async def test_corrupt_state_refuses_until_verify(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "c", 8 * BS, BS, present=False)
    await v.write(2 * BS, b"d" * BS)
    v.close()
    state = tmp_path / "c" / "state"
    raw = bytearray(state.read_bytes())
    raw[40] ^= 0xFF
    state.write_bytes(bytes(raw))
    j = tmp_path / "c" / "journal"
    j.write_bytes(b"")
    v2 = Volume.open(tmp_path / "c")
    assert v2.corrupt_reason is not None
    with pytest.raises(StateCorrupt):
        await v2.read(0, 10)
    with pytest.raises(StateCorrupt):
        await v2.write(0, b"x")
    report = await v2.verify()
    assert report.rebuilt
    assert await v2.read(2 * BS, 3) == b"ddd"
    assert v2.missing_blocks() == [0, 1, 3, 4, 5, 6, 7]  # rebuilt from allocation
    assert v2.written_since_mark() == list(range(8))  # conservative
    v2.close()
    v3 = Volume.open(tmp_path / "c")
    assert v3.corrupt_reason is None
    v3.close()


async def test_damaged_journal_record_mid_file_is_corruption(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "j", 8 * BS, BS, present=False)
    for i in range(3):
        await v.write(i * BS, b"z" * BS, fua=True)
    v.close()
    j = tmp_path / "j" / "journal"
    raw = bytearray(j.read_bytes())
    assert len(raw) >= 3 * 29
    raw[5] ^= 0x01
    j.write_bytes(bytes(raw))
    assert Volume.open(tmp_path / "j").corrupt_reason is not None


async def test_torn_journal_tail_is_dropped(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "t", 8 * BS, BS, present=False)
    await v.write(0, b"z" * BS, fua=True)
    v.close()
    j = tmp_path / "t" / "journal"
    with open(j, "ab") as f:
        f.write(b"\x00\x01\x02")  # a torn append
    v2 = Volume.open(tmp_path / "t")
    assert v2.corrupt_reason is None
    assert 0 not in v2.missing_blocks()
    v2.close()


async def test_compaction_keeps_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgevisor.storage.bitmap import StateStore

    monkeypatch.setattr(StateStore, "COMPACT_AFTER_RECORDS", 3)
    v = Volume.create(tmp_path / "k", 16 * BS, BS, present=False)
    for i in range(0, 16, 2):
        await v.write(i * BS, b"q" * BS, fua=True)
    v.close()
    assert (tmp_path / "k" / "journal").stat().st_size < 4 * 29
    v2 = Volume.open(tmp_path / "k")
    assert v2.missing_blocks() == list(range(1, 16, 2))
    v2.close()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 100),
    ops=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 40), st.booleans()), max_size=20),
)
def test_bitmap_matches_model(n: int, ops: list[tuple[int, int, bool]]) -> None:
    bm = Bitmap(n)
    model = [False] * n
    for first, count, value in ops:
        if first + count > n:
            with pytest.raises(IndexError):
                bm.set_range(first, count, value)
            continue
        bm.set_range(first, count, value)
        for i in range(first, first + count):
            model[i] = value
    assert [bm.get(i) for i in range(n)] == model
    assert bm.count() == sum(model)
    runs = list(bm.runs())
    assert sum(c for _, c, _ in runs) == n
    for f, c, v in runs:
        assert all(model[i] == v for i in range(f, f + c))
    assert Bitmap(n, raw=bm.to_bytes()).to_bytes() == bm.to_bytes()


async def test_fast_path_defers_to_intent_logging_after_a_mark(tmp_path: Path) -> None:
    v = Volume.create(tmp_path / "f", 8 * BS, BS)
    assert v.write_nowait(0, b"a" * BS)  # untracked: the fast path may write
    await v.set_mark()
    assert not v.write_nowait(BS, b"b" * BS)  # needs a durable intent first
    assert v.written_since_mark() == []
    await v.write(BS, b"b" * BS)  # the journaled path
    assert v.write_nowait(BS, b"c" * BS)  # intent already durable for block 1
    assert v.written_since_mark() == [1]
    assert await v.read(BS, 1) == b"c"
    v.close()
