"""The hot set of a real ext4 filesystem (loop device, as root), checked against debugfs
and filefrag: what the mount reads and the extents of the files a process holds open."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevisor.migration.domain_hot import hot_ranges

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

BS = 4096


def _covered(groups: list[list[tuple[int, int]]], off: int, n: int) -> bool:
    return any(o <= off and off + n <= o + m for g in groups for o, m in g)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(BS), str(img)], check=True)
    mnt.mkdir()
    loop = subprocess.run(["losetup", "-f", "--show", str(img)], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            yield img, mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def _holder(path: Path, nbytes: int) -> subprocess.Popen[bytes]:
    """A process that writes ``nbytes`` to ``path`` (kept open for appending) and waits."""
    code = (
        "import os, sys\n"
        "f = open(sys.argv[1], 'ab')\n"
        "f.write(os.urandom(int(sys.argv[2]))); f.flush(); os.fsync(f.fileno())\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(path), str(nbytes)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    return p


def _debugfs(img: Path, req: str) -> str:
    return subprocess.run(["debugfs", "-R", req, str(img)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def _physical_blocks(path: Path) -> list[tuple[int, int]]:
    out = subprocess.run(["filefrag", "-v", "-b4096", str(path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return [
        (int(a), int(b) - int(a) + 1)
        for a, b in re.findall(r"^\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*(\d+):", out, re.M)
    ]


def test_hot_set_names_the_mounts_metadata_and_the_open_files_extents(
    fs: tuple[Path, Path],
) -> None:
    img, mnt = fs
    (mnt / "cold").write_bytes(os.urandom(300_000))  # on the volume, but nobody holds it
    p = _holder(mnt / "kv.log", 200_000)
    try:
        groups = hot_ranges(mnt, [p.pid], max_bytes=4 << 20)
        ino = os.stat(mnt / "kv.log").st_ino
        extents = _physical_blocks(mnt / "kv.log")
        cold = _physical_blocks(mnt / "cold")
    finally:
        p.kill()
        p.wait()
    assert len(groups) == 2
    meta, files = groups
    # the mount's reads: superblock and group descriptors, journal superblock, root inode
    assert _covered([meta], 0, 65536)
    journal = re.search(r"\(0[-\d]*\):(\d+)", _debugfs(img, "stat <8>"))
    assert journal is not None
    assert _covered([meta], int(journal.group(1)) * BS, BS)
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", _debugfs(img, "imap <2>"))
    assert m is not None
    assert _covered([meta], int(m.group(1)) * BS + int(m.group(2), 16), 256)
    # the open file: its inode and every extent, and room to grow after the last one
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", _debugfs(img, f"imap <{ino}>"))
    assert m is not None
    assert _covered(groups, int(m.group(1)) * BS + int(m.group(2), 16), 256)
    assert extents
    for start, count in extents:
        assert _covered(groups, start * BS, count * BS)
    last_start, last_count = extents[-1]
    assert _covered(groups, (last_start + last_count) * BS, 16 * BS)
    # not the file nobody holds open
    for start, count in cold:
        assert not any(o < (start + count) * BS and start * BS < o + n for o, n in files)


def test_hot_set_respects_its_cap_and_a_process_without_files(fs: tuple[Path, Path]) -> None:
    _img, mnt = fs
    p = _holder(mnt / "big", 2 << 20)
    try:
        capped = hot_ranges(mnt, [p.pid], max_bytes=256 << 10)
        idle = hot_ranges(mnt, [os.getpid()], max_bytes=4 << 20)
    finally:
        p.kill()
        p.wait()
    assert sum(n for g in capped for _o, n in g) <= 256 << 10
    assert len(idle) == 1  # the mount's metadata only


def test_hot_set_of_a_path_that_is_not_a_mount_is_empty(tmp_path: Path) -> None:
    assert hot_ranges(tmp_path, [os.getpid()], max_bytes=4 << 20) == []
