"""Content-addressed store of task bundles.

A bundle comes in as a directory, a ``.zip`` or a ``.tar.gz``. It is read into a list of
entries (relative path, kind, mode, bytes or link target) with every safety check done
before anything touches the store: no absolute paths, no ``..``, no device/fifo/hardlink
members, symlinks only when they resolve inside the bundle, a cap on total size and on
the number of files. Modes are normalised to 0o755/0o644 so the same tree hashes the same
wherever it was packed.

The digest is sha256 over the sorted entries (path, kind, mode, content). The store keeps
``<root>/<digest>/`` unpacked (read-only files) and ``<root>/<digest>.tar.gz``, a
deterministic archive (zeroed mtimes/owners) so the controller can store the bytes and
hosts can fetch them and get the same digest. A version's directory is written once,
atomically (rename of a temp dir), and never modified: deploying a new version leaves
calls running on the old one alone.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from edgevisor.errors import RequestError

__all__ = ["Bundle", "BundleError", "BundleStore", "Entry", "digest_entries"]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_FILES = 10_000


class BundleError(RequestError):
    """A bundle was rejected (unsafe path, too large, unreadable archive)."""


@dataclass(frozen=True)
class Entry:
    path: str  # posix, relative, normalised
    kind: str  # "f" file, "d" directory, "l" symlink
    mode: int  # 0o755 or 0o644 for files, 0o755 for dirs, 0o777 for links
    data: bytes = b""  # file content or link target


@dataclass(frozen=True)
class Bundle:
    digest: str
    path: Path  # unpacked tree
    archive: Path  # deterministic .tar.gz
    size_bytes: int


def _norm_path(name: str) -> str:
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"unsafe path in bundle: {name!r} is absolute")
    p = PurePosixPath(name.replace("\\", "/"))
    parts = [part for part in p.parts if part not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"unsafe path in bundle: {name!r} contains '..'")
    if not parts:
        return ""
    return "/".join(parts)


def _check_link(path: str, target: str) -> None:
    if target.startswith("/"):
        raise BundleError(f"symlink {path!r} points outside the bundle ({target!r})")
    depth = len(PurePosixPath(path).parts) - 1
    for part in PurePosixPath(target).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                raise BundleError(f"symlink {path!r} points outside the bundle ({target!r})")
        elif part not in ("", "."):
            depth += 1


def _file_mode(raw: int) -> int:
    return 0o755 if raw & 0o100 else 0o644


class _Limits:
    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.total, self.files = 0, 0

    def add(self, n: int) -> None:
        self.total += n
        self.files += 1
        if self.total > self.max_bytes:
            raise BundleError(f"bundle larger than the limit of {self.max_bytes} bytes")
        if self.files > self.max_files:
            raise BundleError(f"bundle has more than {self.max_files} files")


def _read_capped(f: IO[bytes], limits: _Limits) -> bytes:
    # Read in chunks and count real bytes: declared sizes in an archive can lie.
    buf = bytearray()
    read = f.read
    while True:
        chunk = read(1 << 16)
        if not chunk:
            break
        buf += chunk
        if limits.total + len(buf) > limits.max_bytes:
            raise BundleError(f"bundle larger than the limit of {limits.max_bytes} bytes")
    limits.add(len(buf))
    return bytes(buf)


def _entries_from_dir(root: Path, limits: _Limits) -> list[Entry]:
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            full = base / name
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                _check_link(rel, target)
                out.append(Entry(rel, "l", 0o777, target.encode()))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry(rel, "d", 0o755))
            elif stat.S_ISREG(st.st_mode):
                with full.open("rb") as fh:
                    data = _read_capped(fh, limits)
                out.append(Entry(rel, "f", _file_mode(st.st_mode), data))
            else:
                raise BundleError(f"unsupported file type in bundle: {rel!r}")
        # os.walk does not descend into symlinked dirs with followlinks=False; good.
    return out


def _entries_from_tar(data: bytes, limits: _Limits) -> list[Entry]:
    out: list[Entry] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for m in tf:
                rel = _norm_path(m.name)
                if not rel:
                    continue
                if m.isdir():
                    out.append(Entry(rel, "d", 0o755))
                elif m.isreg():
                    fh = tf.extractfile(m)
                    assert fh is not None
                    out.append(Entry(rel, "f", _file_mode(m.mode), _read_capped(fh, limits)))
                elif m.issym():
                    _check_link(rel, m.linkname)
                    out.append(Entry(rel, "l", 0o777, m.linkname.encode()))
                else:
                    raise BundleError(f"unsupported member type in archive: {m.name!r}")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise BundleError(f"unreadable tar archive: {exc}") from exc
    return out


def _entries_from_zip(data: bytes, limits: _Limits) -> list[Entry]:
    out: list[Entry] = []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                rel = _norm_path(info.filename)
                if not rel:
                    continue
                unix_mode = info.external_attr >> 16
                if info.is_dir():
                    out.append(Entry(rel, "d", 0o755))
                elif stat.S_ISLNK(unix_mode):
                    with zf.open(info) as fh:
                        target = _read_capped(fh, limits).decode()
                    _check_link(rel, target)
                    out.append(Entry(rel, "l", 0o777, target.encode()))
                elif unix_mode == 0 or stat.S_ISREG(unix_mode):
                    with zf.open(info) as fh:
                        out.append(Entry(rel, "f", _file_mode(unix_mode), _read_capped(fh, limits)))
                else:
                    raise BundleError(f"unsupported member type in archive: {info.filename!r}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError) as exc:
        raise BundleError(f"unreadable zip archive: {exc}") from exc
    return out


def _canonical(entries: list[Entry]) -> list[Entry]:
    """Dedupe, add missing parent dirs, sort; strip one wrapping top-level directory."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        if e.path in by_path and by_path[e.path] != e:
            raise BundleError(f"duplicate path in bundle with different content: {e.path!r}")
        by_path[e.path] = e
    tops = {p.split("/", 1)[0] for p in by_path}
    if len(tops) == 1:
        (top,) = tops
        if by_path.get(top, Entry(top, "d", 0o755)).kind == "d" and (
            f"{top}/edgevisor.toml" in by_path
        ):
            by_path = {
                p[len(top) + 1 :]: Entry(p[len(top) + 1 :], e.kind, e.mode, e.data)
                for p, e in by_path.items()
                if p != top
            }
    for p in list(by_path):
        parent = PurePosixPath(p).parent
        while str(parent) != ".":
            existing = by_path.setdefault(str(parent), Entry(str(parent), "d", 0o755))
            if existing.kind != "d":
                # a path below a symlink would be written through it: refuse
                raise BundleError(f"unsafe path in bundle: {p!r} is below a non-directory")
            parent = parent.parent
    return [by_path[p] for p in sorted(by_path)]


def digest_entries(entries: list[Entry]) -> str:
    """sha256 over sorted (path, kind, mode, content) records, length-prefixed."""
    h = hashlib.sha256()
    for e in entries:
        for part in (e.path.encode(), e.kind.encode(), b"%o" % e.mode, e.data):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return h.hexdigest()


def _archive_bytes(entries: list[Entry]) -> bytes:
    raw = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        for e in entries:
            ti = tarfile.TarInfo(e.path)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
            ti.mode = e.mode
            if e.kind == "d":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif e.kind == "l":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.data.decode()
                tf.addfile(ti)
            else:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
    return raw.getvalue()


class BundleStore:
    """Bundles under ``root``: ``<digest>/`` unpacked and ``<digest>.tar.gz``."""

    def __init__(
        self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, max_files: int = DEFAULT_MAX_FILES
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_files = max_files
        root.mkdir(parents=True, exist_ok=True)

    def _limits(self) -> _Limits:
        return _Limits(self.max_bytes, self.max_files)

    def read_entries(self, source: Path | bytes) -> list[Entry]:
        """Read and check a bundle source without storing it."""
        limits = self._limits()
        if isinstance(source, Path) and source.is_dir():
            entries = _entries_from_dir(source, limits)
        else:
            if isinstance(source, Path):
                if source.stat().st_size > self.max_bytes:
                    raise BundleError(f"archive larger than the limit of {self.max_bytes} bytes")
                data = source.read_bytes()
            else:
                data = source
            if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
                entries = _entries_from_zip(data, limits)
            else:
                entries = _entries_from_tar(data, limits)
        return _canonical(entries)

    def add(self, source: Path | bytes) -> Bundle:
        """Store a bundle (directory, .zip or .tar.gz path, or archive bytes)."""
        entries = self.read_entries(source)
        if not entries:
            raise BundleError("bundle is empty")
        digest = digest_entries(entries)
        final = self.root / digest
        archive = self.root / f"{digest}.tar.gz"
        size = sum(len(e.data) for e in entries if e.kind == "f")
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                tmp.chmod(0o755)  # mkdtemp makes it 0700; a sandboxed task runs as another uid
                self._write_tree(tmp, entries)
                try:
                    tmp.rename(final)
                except OSError:
                    if not final.is_dir():  # a concurrent add of the same digest won the race
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        if not archive.is_file():
            tmp_archive = self.root / f".tmp-{digest}-{os.getpid()}.tar.gz"
            tmp_archive.write_bytes(_archive_bytes(entries))
            os.replace(tmp_archive, archive)
        return Bundle(digest, final, archive, size)

    def get(self, digest: str) -> Bundle | None:
        path, archive = self.root / digest, self.root / f"{digest}.tar.gz"
        if not path.is_dir():
            return None
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        return Bundle(digest, path, archive, size)

    def archive_bytes(self, digest: str) -> bytes:
        return (self.root / f"{digest}.tar.gz").read_bytes()

    def remove(self, digest: str) -> None:
        """Delete a version (call only when no call of it can still be running)."""
        path = self.root / digest
        if path.is_dir():
            for p in [path, *path.rglob("*")]:
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
            shutil.rmtree(path, ignore_errors=True)
        (self.root / f"{digest}.tar.gz").unlink(missing_ok=True)

    @staticmethod
    def _write_tree(dest: Path, entries: list[Entry]) -> None:
        for e in entries:
            target = dest / e.path
            if e.kind == "d":
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(0o755)  # whatever the umask: readable by the task's uid
            elif e.kind == "l":
                os.symlink(e.data.decode(), target)
            else:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(e.data)
                os.chmod(target, e.mode & 0o555)  # read-only: a version is immutable
