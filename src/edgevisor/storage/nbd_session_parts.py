"""What an NBD server session needs besides its socket I/O: the exports it may see (by
its TLS peer's identity), the NBD errno for a device error, block-status extents, and the
peer's certificate CN. Shared by the plain session (:mod:`.nbd_conn`) and the TLS session
on its own thread (:mod:`.nbd_tls_session`)."""

from __future__ import annotations

import errno as _errno
import ssl
from typing import TYPE_CHECKING, Any

from edgevisor.proto.nbd_wire import (
    CTX_BASE_ALLOCATION,
    STATE_HOLE,
    STATE_ZERO,
    SYNC_MISSING,
    Errno,
    ExportInfo,
    Request,
)
from edgevisor.storage.blockdev import BlockDevice, OutOfRange

if TYPE_CHECKING:
    from edgevisor.storage.nbd_server import Export, NBDServer

__all__ = ["Catalog", "block_status", "errno_for", "peer_cn"]


class Catalog:
    """The exports one session may see: filtered by its TLS peer identity."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.peer_cn: str | None = None
        self.tls = False

    def _visible(self, export: Export) -> bool:
        if export.allowed_peers is None:
            return True
        return self.tls and self.peer_cn is not None and self.peer_cn in export.allowed_peers

    def lookup(self, name: str) -> ExportInfo | None:
        exp = self.server.exports.get(name)
        if exp is None or not self._visible(exp):
            return None
        return exp.info(self.server.max_payload)

    def names(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.server.exports.values() if self._visible(e)]


def errno_for(exc: BaseException) -> Errno:
    if isinstance(exc, OutOfRange):
        return Errno.EINVAL
    if isinstance(exc, OSError) and exc.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
        return Errno.ENOSPC
    return Errno.EIO


def block_status(
    dev: BlockDevice, contexts: dict[int, str], req: Request
) -> dict[int, tuple[tuple[int, int], ...]]:
    out: dict[int, tuple[tuple[int, int], ...]] = {}
    for cid, name in contexts.items():
        if name == CTX_BASE_ALLOCATION:
            ext = [
                (n, 0 if data else STATE_HOLE | STATE_ZERO)
                for _, n, data in dev.allocated(req.offset, req.length)
            ]
        else:
            ext = [
                (n, 0 if here else SYNC_MISSING)
                for _, n, here in dev.present(req.offset, req.length)
            ]
        out[cid] = tuple(_merge(ext)) or ((req.length, 0),)
    return out


def _merge(ext: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, st in ext:
        if n <= 0:
            continue
        if out and out[-1][1] == st:
            out[-1] = (out[-1][0] + n, st)
        else:
            out.append((n, st))
    return out


def peer_cn(obj: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    cert = obj.getpeercert() if obj is not None else None
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
