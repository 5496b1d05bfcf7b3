"""A FUSE filesystem that exposes one block device as a single image file.

The mount holds exactly one regular file, ``<mountpoint>/image``, whose bytes are the
device's bytes: reads and writes go to :class:`~edgevisor.storage.blockdev.BlockDevice`,
``fsync`` and (after writes) ``close`` call its ``flush()``. The image is then attached to a
loop device and mounted as ext4 (see :mod:`edgevisor.storage.attach`), so an unmodified
program reads files while a lazy volume fetches blocks underneath.

pyfuse3 owns its event loop and process-global state (one session per process), so the
filesystem runs in a process of its own::

    python -m edgevisor.storage.fuse_image MOUNTPOINT --kind file --arg /path/to/file \
        [--ready-fd N] [--direct-io]
    python -m edgevisor.storage.fuse_image --spare --ready-fd N --parent-pid P  # see below

``--kind`` names a device factory: a built-in name from :data:`DEVICE_KINDS` or a
``module:callable`` path. The factory takes ``--arg`` and returns an async context manager
yielding the device, so a real ``Volume`` or a ``LazyVolume`` plugs in without changes here.
When the mount is up the process writes ``ready\\n`` to ``--ready-fd``. It exits when the
mount is unmounted (``fusermount3 -u``) or on SIGTERM/SIGINT, and closes the device on exit.
With ``--spare`` it imports everything and then waits for those arguments as one JSON line
on stdin (:mod:`edgevisor.storage.fuse_spare`).

Speed: every FUSE request costs a trip through Python, so requests must be big. With
``--direct-io`` (what :mod:`edgevisor.storage.attach` uses by default) the kernel passes
reads and writes through at the caller's size, up to ``max_pages`` (1 MiB with libfuse
3.14), and the image gets no page cache of its own under the filesystem's cache. Without
it, reads go through the image's page cache in readahead-sized requests; the mount then
raises its readahead (``/sys/class/bdi/0:N/read_ahead_kb``, ``--readahead-kb``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import cast

import pyfuse3
import pyfuse3.asyncio

from edgevisor.errors import ConfigError, EdgevisorError
from edgevisor.storage.blockdev import BlockDevice, OutOfRange

__all__ = [
    "DEVICE_KINDS",
    "IMAGE_NAME",
    "DeviceFactory",
    "ImageOperations",
    "main",
    "open_volume",
    "resolve_device_factory",
    "serve",
]

log = logging.getLogger(__name__)

IMAGE_NAME = "image"
_IMAGE_NAME_B = IMAGE_NAME.encode()
_ROOT = pyfuse3.ROOT_INODE
_IMAGE = pyfuse3.ROOT_INODE + 1
# The kernel may cache attributes forever: the image never changes size or identity.
_ATTR_TIMEOUT_S = 3600.0
READY_MESSAGE = b"ready\n"

DeviceFactory = Callable[[str], AbstractAsyncContextManager[BlockDevice]]

# Built-in device kinds, imported lazily in the FUSE process. The lead adds the real
# volume kinds here (e.g. "volume", "lazy") once those modules exist.
DEVICE_KINDS: dict[str, str] = {
    "file": "edgevisor.storage.filevolume:open_file_device",
    "volume": "edgevisor.storage.fuse_image:open_volume",
}


@contextlib.asynccontextmanager
async def open_volume(arg: str) -> AsyncIterator[BlockDevice]:
    """Device factory for a :class:`~edgevisor.storage.volume.Volume` directory ``arg``."""
    from edgevisor.storage.volume import Volume  # only the FUSE process needs it

    vol = Volume.open(arg)
    try:
        yield vol
    finally:
        await vol.aclose()


def resolve_device_factory(kind: str) -> DeviceFactory:
    """Turn a built-in kind or a ``module:callable`` path into a device factory."""
    target = DEVICE_KINDS.get(kind, kind)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown device kind {kind!r}: use one of {sorted(DEVICE_KINDS)} "
            "or a 'module:callable' path"
        )
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load device factory {target!r}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"device factory {target!r} is not callable")
    return cast(DeviceFactory, obj)


class ImageOperations(pyfuse3.Operations):
    """The request handlers: a root directory holding one fixed-size file."""

    supports_dot_lookup = False
    enable_writeback_cache = False  # every write reaches the device before it is acked
    enable_acl = False

    def __init__(
        self,
        device: BlockDevice,
        *,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o600,
        direct_io: bool = False,
    ) -> None:
        super().__init__()
        self._dev = device
        self._size = device.size_bytes
        self._uid = uid
        self._gid = gid
        self._mode = mode
        self._direct_io = direct_io
        self._dirty = False
        self._time_ns = time.time_ns()
        self.stats = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0, "flushes": 0}

    # -- attributes -------------------------------------------------------------------

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = _ATTR_TIMEOUT_S
        attr.attr_timeout = _ATTR_TIMEOUT_S
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_rdev = 0
        attr.st_blksize = self._dev.block_size
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._time_ns
        if inode == _ROOT:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 0
            attr.st_blocks = 0
        elif inode == _IMAGE:
            attr.st_mode = stat.S_IFREG | self._mode
            attr.st_nlink = 1
            attr.st_size = self._size
            attr.st_blocks = (self._size + 511) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != _ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == _IMAGE_NAME_B:
            return self._attrs(_IMAGE)
        if name in (b".", b".."):
            return self._attrs(_ROOT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # The image has the device's size, forever; O_TRUNC and ftruncate to another size
        # are refused. Owner, mode and times are not stored (a touch must not fail).
        if fields.update_size and (inode != _IMAGE or attr.st_size != self._size):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = self._dev.block_size
        st.f_blocks = (self._size + self._dev.block_size - 1) // self._dev.block_size
        st.f_bfree = st.f_bavail = 0
        st.f_files = 2
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- directory --------------------------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode != _ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return _ROOT

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, _IMAGE_NAME_B, self._attrs(_IMAGE), 1)

    # -- the image --------------------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode != _IMAGE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and self._size:
            raise pyfuse3.FUSEError(errno.EPERM)
        # keep_cache: the bytes change only through this mount, so cached pages stay valid
        # across opens (a lazy fill writes what a read would have returned).
        return pyfuse3.FileInfo(fh=_IMAGE, direct_io=self._direct_io, keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if off >= self._size or size <= 0:
            return b""
        length = min(size, self._size - off)
        self.stats["reads"] += 1
        self.stats["read_bytes"] += length
        try:
            return await self._dev.read(off, length)
        except EdgevisorError as exc:
            log.warning("read %d+%d failed: %s", off, length, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except OSError as exc:
            log.warning("read %d+%d failed: %s", off, length, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        if not buf:
            return 0
        if off >= self._size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        # A write that crosses the end is cut short, as on a block device node.
        data = buf if off + len(buf) <= self._size else buf[: self._size - off]
        self._dirty = True
        self.stats["writes"] += 1
        self.stats["write_bytes"] += len(data)
        try:
            await self._dev.write(off, data)
        except OutOfRange as exc:
            raise pyfuse3.FUSEError(errno.ENOSPC) from exc
        except EdgevisorError as exc:
            log.warning("write %d+%d failed: %s", off, len(data), exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except OSError as exc:
            log.warning("write %d+%d failed: %s", off, len(data), exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        return len(data)

    async def _flush_device(self) -> None:
        self._dirty = False
        self.stats["flushes"] += 1
        try:
            await self._dev.flush()
        except (EdgevisorError, OSError) as exc:
            self._dirty = True
            log.warning("flush failed: %s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # close(2) of a handle; make writes durable only when there were any, so readers
        # closing the image do not pay for an fsync.
        if self._dirty:
            await self._flush_device()

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self._flush_device()

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        return None


def _mount_options(*, fsname: str) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.update({f"fsname={fsname}", "subtype=edgevisor-image", "allow_other"})
    return opts


def _mount_dev(mountpoint: Path) -> str | None:
    """``major:minor`` of the mount at ``mountpoint`` from mountinfo.

    Not ``os.stat``: stat'ing our own mount before the loop runs would wait on ourselves.
    """
    from edgevisor.storage.hostfs import read_mountinfo

    target = os.path.abspath(mountpoint)
    found = [m.dev for m in read_mountinfo() if m.mount_point == target]
    return found[-1] if found else None  # the last one is the top of the stack


def _raise_readahead(mountpoint: Path, readahead_kb: int) -> None:
    """Raise the mount's readahead so buffered reads arrive in big requests (best effort)."""
    dev = _mount_dev(mountpoint)
    if dev is None:
        log.info("cannot find the mount at %s in mountinfo", mountpoint)
        return
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(str(readahead_kb))
    except OSError as exc:
        log.info("cannot raise readahead of %s: %s", mountpoint, exc)


async def serve(
    device: BlockDevice,
    mountpoint: Path,
    *,
    direct_io: bool = False,
    readahead_kb: int = 1024,
    fsname: str = "edgevisor",
    on_ready: Callable[[], None] | None = None,
    max_tasks: int = 16,
) -> None:
    """Mount ``device`` as ``mountpoint/image`` and serve until unmounted or signalled.

    Runs in the current (asyncio) event loop; pyfuse3 allows one such call per process.
    """
    pyfuse3.asyncio.enable()
    ops = ImageOperations(device, direct_io=direct_io)
    pyfuse3.init(ops, str(mountpoint), _mount_options(fsname=fsname))
    loop = asyncio.get_running_loop()
    stopped_by_signal = False

    def _stop() -> None:
        nonlocal stopped_by_signal
        stopped_by_signal = True
        pyfuse3.terminate()

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stop)
        if readahead_kb > 0:
            _raise_readahead(mountpoint, readahead_kb)
        if on_ready is not None:
            on_ready()
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # After a normal unmount the kernel has already dropped the mount; after a signal
        # we try to unmount (it fails if a loop device still holds the image: then the
        # mount goes stale and attach.recover_stale() clears it).
        pyfuse3.close(unmount=stopped_by_signal)
        log.info("unmounted %s; requests: %s", mountpoint, ops.stats)
        with contextlib.suppress(pyfuse3.FUSEError, EdgevisorError, OSError):
            await device.flush()


async def _run(args: argparse.Namespace) -> int:
    factory = resolve_device_factory(args.kind)
    ready_fd: int | None = args.ready_fd

    def _ready() -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, READY_MESSAGE)
            os.close(ready_fd)
            ready_fd = None
        log.info("serving %s at %s/%s", args.arg, args.mountpoint, IMAGE_NAME)

    async with factory(args.arg) as device:
        await serve(
            device,
            Path(args.mountpoint),
            direct_io=args.direct_io,
            readahead_kb=args.readahead_kb,
            fsname=args.fsname,
            on_ready=_ready,
            max_tasks=args.max_tasks,
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgevisor.storage.fuse_image",
        description="Expose a block device as MOUNTPOINT/image through FUSE.",
    )
    p.add_argument("mountpoint", help="empty directory to mount on")
    p.add_argument(
        "--kind",
        default="file",
        help=f"device factory: one of {sorted(DEVICE_KINDS)} or 'module:callable'",
    )
    p.add_argument("--arg", required=True, help="argument for the factory (e.g. a path)")
    p.add_argument("--ready-fd", type=int, default=None, help="fd to write 'ready' to")
    p.add_argument("--direct-io", action="store_true", help="bypass the image's page cache")
    p.add_argument("--readahead-kb", type=int, default=1024, help="readahead of the mount")
    p.add_argument("--fsname", default="edgevisor", help="source name shown in mountinfo")
    p.add_argument("--max-tasks", type=int, default=16, help="concurrent FUSE requests")
    p.add_argument("--debug", action="store_true", help="log every pyfuse3 debug message")
    return p


_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> None:
    import ctypes  # only spares need it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _spare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgevisor.storage.fuse_image --spare",
        description="Import everything, then wait for the real arguments as one JSON line "
        'on stdin: {"argv": [...], "log_path": "..."}.',
    )
    p.add_argument("--spare", action="store_true", required=True)
    p.add_argument("--ready-fd", type=int, required=True, help="fd to write 'ready' to")
    p.add_argument("--parent-pid", type=int, required=True, help="die if this one is gone")
    p.add_argument("--preload", action="append", default=[], help="device kind to import")
    return p


def spare_main(argv: Sequence[str]) -> int:
    """A spare (see :mod:`edgevisor.storage.fuse_spare`): wait for arguments, then serve.

    Exits 0 without doing anything when stdin ends before a line arrives (the pool closed).
    """
    args = _spare_parser().parse_args(argv)
    # While spare, die with the agent; the check after prctl closes the race with an agent
    # that died before it (we were then re-parented already and would never get a signal).
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != args.parent_pid:
        return 0
    for kind in [*DEVICE_KINDS, *args.preload]:
        with contextlib.suppress(ConfigError):
            resolve_device_factory(kind)
    # what serving imports lazily (pydantic via hostfs alone is ~70 ms)
    for module in ("edgevisor.storage.hostfs", "edgevisor.storage.volume"):
        importlib.import_module(module)
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    # From here on this process may serve a mount, which must outlive an agent restart.
    _set_pdeathsig(0)
    msg = json.loads(line)
    log_fd = os.open(msg["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    return main([*msg["argv"], "--ready-fd", str(args.ready_fd)])


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--spare"]:
        return spare_main(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s fuse_image[%(process)d] %(levelname)s %(message)s",
    )
    try:
        return asyncio.run(_run(args))
    except EdgevisorError as exc:
        log.error("%s", exc.message)
        return 2
    except RuntimeError as exc:  # pyfuse3.init reports mount failures this way
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
