"""Content-addressed bundle store: canonical digest, safe extraction, immutable versions."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgevisor.tasks.bundles import BundleError, BundleStore

MANIFEST = b'name = "hello"\nruntime = "python"\nhandler = "main:handler"\n'


def _tree(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "edgevisor.toml").write_bytes(MANIFEST)
    (root / "main.py").write_bytes(b"def handler(e, c):\n    return e\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "util.py").write_bytes(b"X = 1\n")
    run = root / "run.sh"
    run.write_bytes(b"#!/bin/sh\ncat\n")
    run.chmod(0o755)
    os.symlink("pkg/util.py", root / "link.py")
    return root


def _tar(
    members: list[tuple[str, bytes, int]], *, extra: tuple[tarfile.TarInfo, ...] = ()
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data, mode in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), mode
            tf.addfile(ti, io.BytesIO(data))
        for ti in extra:
            tf.addfile(ti)
    return buf.getvalue()


def _zip(members: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            zi = zipfile.ZipInfo(name)
            zi.external_attr = (stat.S_IFREG | mode) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
    return buf.getvalue()


def test_dir_is_stored_unpacked_readonly_with_archive(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    b = store.add(_tree(tmp_path / "src"))
    assert b.path == tmp_path / "store" / b.digest
    assert (b.path / "main.py").read_bytes().startswith(b"def handler")
    assert (b.path / "run.sh").stat().st_mode & 0o111
    assert not (b.path / "main.py").stat().st_mode & 0o222  # immutable version
    assert os.readlink(b.path / "link.py") == "pkg/util.py"
    assert b.archive.is_file()
    # the archive, fetched by another host, gives the same digest and tree
    other = BundleStore(tmp_path / "other")
    b2 = other.add(store.archive_bytes(b.digest))
    assert b2.digest == b.digest
    assert store.archive_bytes(b.digest) == other.archive_bytes(b.digest)  # deterministic


def test_digest_is_canonical_across_formats_and_wrapping(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    members = [("edgevisor.toml", MANIFEST, 0o600), ("main.py", b"x = 1\n", 0o640)]
    d_tar = store.add(_tar(members)).digest
    d_zip = store.add(_zip(members)).digest
    wrapped = [(f"hello-1.0/{n}", d, m) for n, d, m in members]
    d_wrapped = store.add(_tar(wrapped)).digest
    assert d_tar == d_zip == d_wrapped
    # content and exec bit are part of the digest
    assert store.add(_tar([members[0], ("main.py", b"x = 2\n", 0o640)])).digest != d_tar
    assert store.add(_tar([members[0], ("main.py", b"x = 1\n", 0o750)])).digest != d_tar


def test_new_version_does_not_touch_old(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    src = _tree(tmp_path / "src")
    v1 = store.add(src)
    before = {p: p.read_bytes() for p in v1.path.rglob("*") if p.is_file() and not p.is_symlink()}
    (src / "main.py").chmod(0o644)
    (src / "main.py").write_bytes(b"def handler(e, c):\n    return 2\n")
    v2 = store.add(src)
    assert v2.digest != v1.digest
    after = {p: p.read_bytes() for p in v1.path.rglob("*") if p.is_file() and not p.is_symlink()}
    assert before == after
    assert store.add(src).digest == v2.digest  # same content again: same version, no error
    assert not list(store.root.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("name", "match"),
    [("/etc/passwd", "absolute"), ("../escape.py", r"'\.\.'"), ("a/../../b", r"'\.\.'")],
)
def test_unsafe_member_paths_rejected(tmp_path: Path, name: str, match: str) -> None:
    store = BundleStore(tmp_path / "store")
    for data in (_tar([(name, b"x", 0o644)]), _zip([(name, b"x", 0o644)])):
        with pytest.raises(BundleError, match=match):
            store.add(data)
    assert not any(p.name != ".tmp" for p in store.root.iterdir())


def _link(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti


@pytest.mark.parametrize(
    ("link", "target"), [("evil", "/etc"), ("evil", "../.."), ("sub/evil", "../../x")]
)
def test_symlinks_escaping_rejected(tmp_path: Path, link: str, target: str) -> None:
    store = BundleStore(tmp_path / "store")
    with pytest.raises(BundleError, match="outside the bundle"):
        store.add(_tar([("main.py", b"", 0o644)], extra=(_link(link, target),)))


def test_path_through_symlink_rejected(tmp_path: Path) -> None:
    # "x" -> "." passes a lexical check, but "x/y" -> "../z" would then land outside
    store = BundleStore(tmp_path / "store")
    with pytest.raises(BundleError, match="below a non-directory"):
        store.add(_tar([("main.py", b"", 0o644)], extra=(_link("x", "."), _link("x/y", "../z"))))


def test_symlink_in_source_dir_escaping_rejected(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    os.symlink("/etc/passwd", src / "pw")
    with pytest.raises(BundleError, match="outside the bundle"):
        BundleStore(tmp_path / "store").add(src)


def test_devices_and_hardlinks_rejected(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    hard = tarfile.TarInfo("h")
    hard.type, hard.linkname = tarfile.LNKTYPE, "main.py"
    fifo = tarfile.TarInfo("f")
    fifo.type = tarfile.FIFOTYPE
    for ti in (hard, fifo):
        with pytest.raises(BundleError, match="unsupported member type"):
            store.add(_tar([("main.py", b"", 0o644)], extra=(ti,)))


def test_size_cap_counts_real_bytes(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store", max_bytes=1000)
    # compresses to almost nothing but unpacks past the cap (a small zip bomb)
    bomb = _zip([("big.bin", b"\0" * 5000, 0o644)])
    assert len(bomb) < 1000
    with pytest.raises(BundleError, match="larger than the limit"):
        store.add(bomb)
    with pytest.raises(BundleError, match="larger than the limit"):
        store.add(_tar([("big.bin", b"\0" * 5000, 0o644)]))


def test_file_count_cap(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store", max_files=3)
    with pytest.raises(BundleError, match="more than 3 files"):
        store.add(_tar([(f"f{i}", b"", 0o644) for i in range(5)]))


def test_garbage_archive_rejected(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    with pytest.raises(BundleError, match="unreadable"):
        store.add(b"this is not an archive at all")
    with pytest.raises(BundleError, match="unreadable"):
        store.add(b"PK\x03\x04garbage")


def test_remove_deletes_version(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    b = store.add(_tree(tmp_path / "src"))
    assert store.get(b.digest) is not None
    store.remove(b.digest)
    assert store.get(b.digest) is None
    assert not b.archive.exists()


def test_stored_tree_is_readable_by_other_uids(tmp_path: Path) -> None:
    """Regression: mkdtemp made the version dir 0700, so a sandboxed task (uid 65534)
    could not read its own bundle."""
    old = os.umask(0o077)
    try:
        b = BundleStore(tmp_path / "store").add(_tree(tmp_path / "src"))
    finally:
        os.umask(old)
    for p in [b.path, *b.path.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        assert mode & 0o004, p  # world-readable
        if p.is_dir():
            assert mode & 0o001, p  # and traversable


def test_archive_files_on_disk(tmp_path: Path) -> None:
    members = [("edgevisor.toml", MANIFEST, 0o644), ("main.py", b"x = 1\n", 0o644)]
    tgz, zp = tmp_path / "b.tar.gz", tmp_path / "b.zip"
    tgz.write_bytes(_tar(members))
    zp.write_bytes(_zip(members))
    store = BundleStore(tmp_path / "store")
    a, b = store.add(tgz), store.add(zp)
    assert a.digest == b.digest
    assert (a.path / "main.py").read_bytes() == b"x = 1\n"
    small = BundleStore(tmp_path / "small", max_bytes=10)
    with pytest.raises(BundleError, match="larger than the limit"):
        small.add(tgz)
