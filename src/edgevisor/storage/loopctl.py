"""Loop devices through their ioctls: what ``losetup`` does, without starting ``losetup``.

Attaching: ``LOOP_CTL_GET_FREE`` on ``/dev/loop-control`` names a free device, then
``LOOP_CONFIGURE`` binds the backing file's descriptor to it in one call (backing file,
flags and name together). Another process may bind the same free device between the two
calls: the kernel then answers EBUSY and we ask for the next free one. Flags are what
``losetup --find --show [--direct-io=on]`` sets: no autoclear, no partition scan, direct
I/O only when asked. Detaching is ``LOOP_CLR_FD``; on a device that is still open the
kernel turns it into autoclear (it goes when the last opener lets go), like ``losetup -d``.

Blocking calls. ``LOOP_CONFIGURE`` fsyncs the backing file, which on a FUSE image is a
request to the FUSE process, which may need the caller's own event loop (an NBD export it
serves) to answer: async callers must run these in a thread, never on the loop. Kernels
without ``LOOP_CONFIGURE`` (< 5.8) answer EINVAL or ENOTTY: :class:`LoopUnsupported` tells
the caller to use the tool instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct

__all__ = [
    "LoopUnsupported",
    "attach_loop",
    "clear_loop",
    "find_loop",
]

LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
_LOOP_MAJOR = 7

# struct loop_info64 (linux/loop.h): 5 x u64, 4 x u32, file name, crypt name, key, 2 x u64
_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
# struct loop_config: u32 fd, u32 block_size, loop_info64, 8 x u64 reserved
_CONFIG = struct.Struct(f"=II{_INFO64.size}s64x")
_GET_FREE_TRIES = 64


class LoopUnsupported(OSError):
    """The kernel (or this container) cannot configure loop devices by ioctl."""


def _open_dev(device: str, number: int) -> int:
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # /dev without devtmpfs (some containers): make the node ourselves
        with contextlib.suppress(FileExistsError):
            os.mknod(device, 0o660 | stat.S_IFBLK, os.makedev(_LOOP_MAJOR, number))
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)


def attach_loop(image: str, *, direct_io: bool = False) -> str:
    """Bind ``image`` to a free loop device and return its path (``/dev/loopN``).

    Raises :class:`LoopUnsupported` when the ioctls are not available here, OSError for
    anything else (the image cannot be opened, no free device after many races).
    """
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        info = _INFO64.pack(
            0, 0, 0, 0, 0, 0, 0, 0,
            LO_FLAGS_DIRECT_IO if direct_io else 0,
            os.fsencode(image)[: LO_NAME_SIZE - 1], b"", b"", 0, 0,
        )  # fmt: skip
        config = _CONFIG.pack(backing, 0, info)
        try:
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise LoopUnsupported(exc.errno, f"/dev/loop-control: {exc.strerror}") from exc
        try:
            for _ in range(_GET_FREE_TRIES):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                dev_fd = _open_dev(device, number)
                try:
                    fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        continue  # someone bound it between GET_FREE and CONFIGURE
                    if exc.errno in (errno.EINVAL, errno.ENOTTY):
                        raise LoopUnsupported(exc.errno, "LOOP_CONFIGURE") from exc
                    raise
                finally:
                    os.close(dev_fd)
                return device
        finally:
            os.close(ctl)
    finally:
        os.close(backing)
    raise OSError(errno.EBUSY, f"no free loop device after {_GET_FREE_TRIES} tries")


def clear_loop(device: str) -> None:
    """Unbind ``device``; a device bound to nothing already is fine (idempotent)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: not bound
            raise
    finally:
        os.close(fd)


def find_loop(image: str) -> str | None:
    """The loop device bound to ``image`` (the same inode, not only the same path)."""
    try:
        st = os.stat(image)
    except OSError:
        return None
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in sorted(names):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as fh:
                if fh.read().rstrip("\n") != image:
                    continue
        except OSError:
            continue
        device = f"/dev/{name}"
        if _status_matches(device, st):
            return device
    return None


def _status_matches(device: str, st: os.stat_result) -> bool:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_INFO64.size))
    except OSError:
        return False
    finally:
        os.close(fd)
    lo_device, lo_inode = _INFO64.unpack(raw)[:2]
    return bool(lo_inode == st.st_ino and lo_device == st.st_dev)
