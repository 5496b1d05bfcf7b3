"""The hot set of a running domain's volume: byte ranges its service will read first.

A migration's target starts the domain on a lazy volume right after the switch; every
block the mount and the service's start-up read that is not there yet is fetched from
the source on demand, one round trip each, inside the switch's downtime. The source
knows which blocks those are likely to be, so it names them ahead (at the flush before
the switch, while the domain still serves) and the target fetches them all at once when
the source's data is final (the lazy volume's release), alongside the mount instead of
one by one behind it.

Which ranges (in this order, the total capped at ``max_bytes``):

1. ext4's mount-time metadata: the superblock and group descriptors (the first 64 KiB),
   the journal's superblock, the root directory's inode and blocks;
2. (a second group: the target asks for it once it has the first, so it does not delay
   the mount) for each file (and directory) the domain's processes hold open on the volume: its
   inode's block and its extents (``FIEMAP``); a file open for writing gets
   ``grow_bytes`` more after its last extent (it keeps growing until the freeze, and
   ext4 allocates next to the last extent).

Only a hint: a wrong or stale range costs a fetch the fill would have done anyway, a
missing one a fetch on demand as before. Correctness does not depend on it (the target
fetches only after the release, so every byte it gets is final).

Pure parts (:func:`parse_ext4_geometry`, :func:`inode_offset`, :func:`extent_start`,
:func:`plan_ranges`, :func:`groups_from_payload`) take bytes and numbers;
:func:`hot_ranges` does the I/O (``/proc``, ``FIEMAP``, reads of the filesystem's
device) and runs in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Ext4Geometry",
    "extent_start",
    "fiemap",
    "groups_from_payload",
    "hot_ranges",
    "inode_offset",
    "parse_ext4_geometry",
    "plan_ranges",
]

_EXT4_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80
_ROOT_INO = 2
_JOURNAL_INO = 8
_HEAD_BYTES = 64 * 1024  # superblock + group descriptors of a small volume
_ALIGN = 4096

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags
_FE_UNMAPPED = 0x2 | 0x4 | 0x8  # UNKNOWN, DELALLOC, ENCODED: no usable physical address
_FIEMAP_BATCH = 64

Range = tuple[int, int]
"""(offset, length) in bytes on the volume."""


@dataclass(frozen=True)
class Ext4Geometry:
    block_size: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    gdt_offset: int  # byte offset of the group descriptor table


def parse_ext4_geometry(sb: bytes) -> Ext4Geometry | None:
    """The superblock's fields :func:`inode_offset` needs (``sb``: the 1024 bytes at byte
    1024 of the device); None when it is not ext2/3/4."""
    if len(sb) < 0x100 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
        return None
    first_data_block, log_bs = struct.unpack_from("<II", sb, 0x14)
    ipg = struct.unpack_from("<I", sb, 0x28)[0]
    inode_size = struct.unpack_from("<H", sb, 0x58)[0] or 128
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if incompat & _INCOMPAT_64BIT else 32
    bs = 1024 << log_bs
    if ipg == 0 or bs > 65536 or desc_size < 32:
        return None
    return Ext4Geometry(bs, ipg, inode_size, desc_size, (first_data_block + 1) * bs)


def inode_offset(geo: Ext4Geometry, ino: int, desc: bytes) -> int:
    """Byte offset of inode ``ino`` on the device; ``desc`` is its group's descriptor
    (``geo.desc_size`` bytes at ``geo.gdt_offset + group * geo.desc_size``)."""
    lo: int = struct.unpack_from("<I", desc, 0x8)[0]
    hi: int = struct.unpack_from("<I", desc, 0x28)[0] if geo.desc_size >= 64 else 0
    table = (hi << 32 | lo) * geo.block_size
    return table + ((ino - 1) % geo.inodes_per_group) * geo.inode_size


def inode_group(geo: Ext4Geometry, ino: int) -> int:
    return (ino - 1) // geo.inodes_per_group


def extent_start(geo: Ext4Geometry, inode: bytes) -> int | None:
    """Byte offset of an extent-mapped inode's first block (from the extent header in
    ``i_block``, a leaf), or None (not extents, or an index node)."""
    if len(inode) < 0x28 + 24:
        return None
    magic, entries, _max, depth = struct.unpack_from("<HHHH", inode, 0x28)
    if magic != 0xF30A or entries == 0 or depth != 0:
        return None
    start_hi: int
    start_lo: int
    _lblk, _len, start_hi, start_lo = struct.unpack_from("<IHHI", inode, 0x28 + 12)
    return (start_hi << 32 | start_lo) * geo.block_size


def plan_ranges(groups: Iterable[Iterable[Range]], max_bytes: int) -> list[list[Range]]:
    """The groups' ranges 4 KiB aligned, merged within a group, without what an earlier
    group has, the total capped at ``max_bytes`` (earlier groups first); empty groups
    dropped."""
    taken: list[Range] = []
    out: list[list[Range]] = []
    budget = max_bytes
    for group in groups:
        mine: list[Range] = []
        for off, n in _merge(_align(r) for r in group if r[1] > 0):
            for piece in _subtract((off, n), taken):
                if budget <= 0:
                    break
                piece = (piece[0], min(piece[1], budget))
                mine.append(piece)
                budget -= piece[1]
            taken = _merge([*taken, *mine])
        if mine:
            out.append(_merge(mine))
    return out


def groups_from_payload(raw: object, max_ranges: int) -> list[list[Range]]:
    """``[[[offset, length], ...], ...]`` (as JSON carries a hot set) checked, at most
    ``max_ranges`` ranges; anything malformed is dropped (a hint)."""
    out: list[list[Range]] = []
    left = max_ranges
    for group in raw if isinstance(raw, list) else []:
        ranges: list[Range] = []
        for r in group[:left] if isinstance(group, list) else []:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                off, n = int(r[0]), int(r[1])
                if off >= 0 and n > 0:
                    ranges.append((off, n))
        left -= len(ranges)
        if ranges:
            out.append(ranges)
    return out


def _align(r: Range) -> Range:
    lo = r[0] - r[0] % _ALIGN
    hi = -(-(r[0] + r[1]) // _ALIGN) * _ALIGN
    return lo, hi - lo


def _merge(rs: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for off, n in sorted(rs):
        if out and off <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], off + n) - last[0])
        else:
            out.append((off, n))
    return out


def _subtract(r: Range, taken: list[Range]) -> list[Range]:
    lo, hi = r[0], r[0] + r[1]
    out: list[Range] = []
    for t_lo, t_n in taken:  # sorted, merged
        t_hi = t_lo + t_n
        if t_hi <= lo or t_lo >= hi:
            continue
        if t_lo > lo:
            out.append((lo, t_lo - lo))
        lo = max(lo, t_hi)
    if lo < hi:
        out.append((lo, hi - lo))
    return out


# -- I/O -------------------------------------------------------------------------------


def fiemap(fd: int) -> list[Range]:
    """The physical extents of an open file (or directory) on its device."""
    out: list[Range] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, start, 0xFFFFFFFFFFFFFFFF - start, 0, 0, _FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        last = False
        for i in range(mapped):
            logical, physical, length, _r1, _r2, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
            )
            if not flags & _FE_UNMAPPED:
                out.append((physical, length))
            start = logical + length
            last = bool(flags & 0x1)
        if mapped < _FIEMAP_BATCH or last:
            return out


def _mount_source(mnt: Path) -> str | None:
    """The device mounted at ``mnt`` (from this process's mountinfo)."""
    target = os.path.realpath(mnt)
    found: str | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4] == target:
                found = right.split()[1]  # the last mount there wins
    return found


def _open_files(pids: Iterable[int], dev: int) -> list[tuple[int, bool]]:
    """(fd opened here, open for writing by the domain) of every regular file and
    directory the processes ``pids`` hold open on device ``dev``; the caller closes."""
    seen: set[int] = set()
    out: list[tuple[int, bool]] = []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for n in names:
            try:
                st = os.stat(f"{fd_dir}/{n}")
                if st.st_dev != dev or st.st_ino in seen:
                    continue
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}") as fi:
                    flags = int(fi.read().split("flags:")[1].split()[0], 8)
                fd = os.open(f"{fd_dir}/{n}", os.O_RDONLY | os.O_CLOEXEC)  # the magic link
            except (OSError, ValueError, IndexError):
                continue
            seen.add(st.st_ino)
            out.append((fd, bool(flags & (os.O_WRONLY | os.O_RDWR))))
    return out


def hot_ranges(
    mnt: Path, pids: Iterable[int], *, max_bytes: int, grow_bytes: int = 64 * 1024
) -> list[list[Range]]:
    """The hot set of the ext4 filesystem mounted at ``mnt`` as used by ``pids`` (see the
    module docstring), in two groups: what the mount reads, then the open files. Best
    effort: what cannot be read is left out."""
    dev_path = _mount_source(mnt)
    if dev_path is None:
        return []
    meta: list[Range] = [(0, _HEAD_BYTES)]
    files: list[Range] = []
    root_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    opened = [(root_fd, False)]
    try:
        dev = os.fstat(root_fd).st_dev
        opened += _open_files(pids, dev)
        with open(dev_path, "rb", buffering=0) as devf:
            geo = parse_ext4_geometry(os.pread(devf.fileno(), 1024, 1024))
            if geo is None:
                return []

            def inode_at(ino: int) -> tuple[int, bytes]:
                g = inode_group(geo, ino)
                desc = os.pread(devf.fileno(), geo.desc_size, geo.gdt_offset + g * geo.desc_size)
                off = inode_offset(geo, ino, desc)
                return off, os.pread(devf.fileno(), geo.inode_size, off)

            with contextlib.suppress(OSError, struct.error):
                _off, journal = inode_at(_JOURNAL_INO)
                start = extent_start(geo, journal)
                if start is not None:
                    meta.append((start, geo.block_size))
            for i, (fd, writing) in enumerate(opened):
                with contextlib.suppress(OSError, struct.error):
                    off, _inode = inode_at(os.fstat(fd).st_ino)
                    (meta if i == 0 else files).append((off, geo.inode_size))
                    extents = fiemap(fd)
                    if writing and extents:
                        last_off, last_n = extents[-1]
                        extents.append((last_off + last_n, grow_bytes))
                    (meta if i == 0 else files).extend(extents)
    except OSError:
        return plan_ranges([meta], max_bytes)
    finally:
        for fd, _w in opened:
            os.close(fd)
    return plan_ranges([meta, files], max_bytes)
