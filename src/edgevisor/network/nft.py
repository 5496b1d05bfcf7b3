"""In-process nftables through ``libnftables.so.1`` (ctypes).

The ``nft`` command costs 15 ms+ per call in process start alone; the library applies one
element in ~0.2 ms. Each :class:`Nft` owns one libnftables context. The context opens its
netlink socket when it is created, so a context created while the calling thread is inside
a network namespace keeps working on that namespace from any thread afterwards; that is
how one process drives the tables of several simulated hosts (``netns=``). An agent runs
in its host namespace and passes ``netns=None``.

Every buffer given to :meth:`Nft.run` is one kernel transaction: either all of it applies
or none of it does. Failures become :class:`NftError` carrying the library's message.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgevisor.errors import UnavailableError
from edgevisor.network import netns as _netns

if TYPE_CHECKING:
    from edgevisor.network.nft_netlink import EncodedBatch

__all__ = ["Nft", "NftError", "NftSocket"]

_LIBRARY = "libnftables.so.1"
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class NftError(UnavailableError):
    """libnftables refused a command batch; nothing of the batch was applied."""

    code = "nft_failed"


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(_LIBRARY)
            except OSError as exc:  # the package libnftables1 is missing
                raise NftError(f"cannot load {_LIBRARY}: {exc}") from exc
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.restype = None
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.restype = ctypes.c_int
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.restype = ctypes.c_int
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.restype = None
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _lib = lib
        return _lib


class Nft:
    """One libnftables context bound to a network namespace.

    Not thread-safe: the context's output buffers are shared, so calls are serialized
    with a lock.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._lib = _library()
        self._lock = threading.Lock()
        self.netns = netns
        ctx = _netns.call_in(netns, lambda: self._lib.nft_ctx_new(0))
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, buffer: str, *, json_output: bool) -> str:
        with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise NftError("nftables context is closed")
            flags = self._lib.nft_ctx_output_get_flags(ctx)
            flags = flags | _OUTPUT_JSON if json_output else flags & ~_OUTPUT_JSON
            self._lib.nft_ctx_output_set_flags(ctx, flags)
            rc = self._lib.nft_run_cmd_from_buffer(ctx, buffer.encode())
            out = (self._lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(
                f"nftables batch failed: {err.strip() or 'rc=' + str(rc)}",
                details={"rc": rc, "stderr": err[:4000]},
            )
        return out

    def run(self, commands: str) -> str:
        """Apply a text batch (one transaction); return the text output."""
        return self._run(commands, json_output=False)

    def run_json(self, commands: dict[str, Any]) -> Any:
        """Apply a libnftables JSON batch ``{"nftables": [...]}`` (one transaction)."""
        out = self._run(json.dumps(commands), json_output=True)
        return json.loads(out) if out.strip() else None

    def query(self, command: str) -> Any:
        """Run a listing command (e.g. ``list table ip t``) and return its parsed JSON."""
        out = self._run(command, json_output=True)
        return json.loads(out) if out.strip() else None


class NftSocket:
    """A NETLINK_NETFILTER socket that commits encoded element batches (see
    :mod:`~edgevisor.network.nft_netlink`): one ``sendmsg`` per batch, then the acks up to
    the one of ``BATCH_END``. Opened in ``netns`` like :class:`Nft`; not thread-safe
    (calls are serialized with a lock).

    Opening sends an empty batch: a kernel that does not ack ``BATCH_END`` (older than
    6.1) cannot be used this way and raises :class:`NftError`, so a caller keeps to
    libnftables instead of waiting on acks that never come.
    """

    def __init__(self, netns: str | None = None, *, timeout_s: float = 5.0) -> None:
        from edgevisor.network import nft_netlink as _nl

        self._nl = _nl
        self._lock = threading.Lock()
        self.netns = netns
        self.timeout_s = timeout_s
        self._seq = int.from_bytes(os.urandom(2), "big") << 8  # sequences of this socket
        try:
            self._sock = _netns.call_in(netns, self._open)
        except OSError as exc:
            raise NftError(f"cannot open a netfilter netlink socket: {exc}") from exc
        self._sock.settimeout(timeout_s)
        self._buf = 0
        self._unread = False  # an exchange was abandoned: answers may be queued
        try:
            self.commit(_nl.encode_empty(self._seq), _probe=True)
        except BaseException:
            self._sock.close()
            raise

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            # Extended acks name the refused attribute; capped acks carry only the header
            # of the refused message (not up to 64 KiB of it).
            sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def seq(self) -> int:
        """The sequence number the next batch should start at (``encode_batch(..., seq)``)."""
        return self._seq

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NftSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def commit(self, batch: EncodedBatch, *, _probe: bool = False) -> None:
        """Send an :class:`~edgevisor.network.nft_netlink.EncodedBatch` (one kernel
        transaction) and wait for its acks; raise
        :class:`~edgevisor.network.nft_netlink.NetlinkBatchError` if it was refused."""
        nl = self._nl
        reader = nl.AckReader(batch)
        sent = False
        with self._lock:
            sock = self._sock
            self._size_buffers(len(batch.data), batch.message_count)
            try:
                if self._unread:
                    self._drain()
                self._unread = True
                sock.send(batch.data)
                sent = True
                # The kernel handles the batch inside send(): every answer is queued when
                # it returns. A refused batch gets no ack of BATCH_END, so after an error
                # the queue is read until empty.
                while not reader.done:
                    if reader.error is not None:
                        self._drain(reader.feed)
                        break
                    reader.feed(sock.recv(65536))
                self._unread = False
            except TimeoutError as exc:
                raise nl.NetlinkBatchError(
                    f"no ack of the nftables batch within {self.timeout_s} s"
                    + (" (kernel older than 6.1?)" if _probe else ""),
                    errno=errno.ETIMEDOUT, fallback_ok=False) from exc
            except OSError as exc:
                # Refused before the kernel saw it (EMSGSIZE, ENOBUFS on send): nothing
                # applied. Failed while reading answers (ENOBUFS: acks lost): unknown.
                raise nl.NetlinkBatchError(
                    f"nftables netlink batch: {exc}", errno=exc.errno or errno.EIO,
                    fallback_ok=not sent) from exc
            finally:
                self._seq = (batch.end_seq + 1) & 0xFFFFFFFF
        if reader.error is not None:
            raise reader.error

    def _size_buffers(self, size: int, messages: int) -> None:
        """Large batches need room to be sent whole and for one ack per message."""
        want = max(size * 2, messages * 1024)
        if want > self._buf and want > 212_992:
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, want)
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, want)
            self._buf = want

    def _drain(self, feed: Callable[[bytes], None] | None = None) -> None:
        """Read what is queued without waiting: answers a previous, abandoned batch left
        behind (dropped) or the rest of a refused batch's answers (``feed``)."""
        timeout = self._sock.gettimeout()
        self._sock.setblocking(False)
        try:
            while True:
                try:
                    data = self._sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    return
                if feed is not None:
                    feed(data)
        finally:
            self._sock.settimeout(timeout)
