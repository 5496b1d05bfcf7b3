"""Server replies of the sans-IO NBD core as bytes: simple or structured (per the
connection's negotiation), data with holes, errors with a message, block status.

Pure functions of a request and its answer; :class:`~.nbd_server_core.ServerConnection`
keeps the state (what is in flight, what was negotiated) and calls these.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from edgevisor.proto.nbd_wire import (
    CMD_FLAG_DF,
    CMD_FLAG_REQ_ONE,
    MAX_STRING,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HDR,
    STRUCTURED_REPLY_MAGIC,
    BlockStatusReply,
    Errno,
    LocalProtocolError,
    ReadReply,
    ReplyType,
    Request,
)

__all__ = [
    "block_status_reply",
    "error_reply",
    "ok_reply",
    "read_frame",
    "read_header",
    "read_reply",
]

_DATA_CHUNK_HDR = struct.Struct(STRUCTURED_HDR.format + "Q")


def ok_reply(handle: int, structured: bool) -> bytes:
    if structured:
        return STRUCTURED_HDR.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, handle, 0
        )
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)


def error_reply(handle: int, err: Errno, message: str, structured: bool) -> bytes:
    if structured:
        msg = message.encode()[:MAX_STRING]
        payload = struct.pack(">IH", int(err), len(msg)) + msg
        return (
            STRUCTURED_HDR.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, handle, len(payload)
            )
            + payload
        )
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, int(err), handle)


def read_header(req: Request, structured: bool) -> bytes:
    """The header of a READ answered as one data chunk (the payload follows it)."""
    if not structured:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, req.handle)
    return _DATA_CHUNK_HDR.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, req.handle,
        8 + req.length, req.offset,
    )  # fmt: skip


def read_frame(req: Request, structured: bool) -> tuple[bytearray, int]:
    """A READ's whole one-chunk reply with its header filled in, and where the payload
    (exactly the request's length) goes."""
    if not structured:
        frame = bytearray(SIMPLE_REPLY.size + req.length)
        SIMPLE_REPLY.pack_into(frame, 0, SIMPLE_REPLY_MAGIC, 0, req.handle)
        return frame, SIMPLE_REPLY.size
    frame = bytearray(_DATA_CHUNK_HDR.size + req.length)
    _DATA_CHUNK_HDR.pack_into(
        frame, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, req.handle,
        8 + req.length, req.offset,
    )  # fmt: skip
    return frame, _DATA_CHUNK_HDR.size


def read_reply(req: Request, ev: ReadReply, structured: bool) -> bytes:
    """A READ's answer: holes as hole chunks where structured replies allow them."""
    hole_total = sum(n for _, n in ev.holes)
    if len(ev.data) + hole_total != req.length:
        raise LocalProtocolError("read reply does not cover the request exactly")
    if not structured or req.flags & CMD_FLAG_DF or not ev.holes:
        data = _materialize(req, ev) if ev.holes else ev.data
        if not structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, req.handle) + data
        head = STRUCTURED_HDR.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, req.handle,
            8 + len(data),
        )  # fmt: skip
        return head + struct.pack(">Q", req.offset) + data
    chunks: list[tuple[int, int, bytes]] = []  # (type, offset, payload)
    pos, used = req.offset, 0
    for hoff, hlen in sorted(ev.holes):
        if hoff < pos or hoff + hlen > req.offset + req.length or hlen <= 0:
            raise LocalProtocolError("read reply holes overlap or leave the range")
        if hoff > pos:
            n = hoff - pos
            chunks.append((ReplyType.OFFSET_DATA, pos, ev.data[used : used + n]))
            used += n
        chunks.append((ReplyType.OFFSET_HOLE, hoff, struct.pack(">I", hlen)))
        pos = hoff + hlen
    if pos < req.offset + req.length:
        chunks.append((ReplyType.OFFSET_DATA, pos, ev.data[used:]))
    out = bytearray()
    for i, (typ, off, payload) in enumerate(chunks):
        flag = REPLY_FLAG_DONE if i == len(chunks) - 1 else 0
        out += STRUCTURED_HDR.pack(STRUCTURED_REPLY_MAGIC, flag, typ, req.handle, 8 + len(payload))
        out += struct.pack(">Q", off)
        out += payload
    return bytes(out)


def block_status_reply(req: Request, ev: BlockStatusReply, contexts: Collection[int]) -> bytes:
    """A BLOCK_STATUS answer: one chunk per negotiated context, the last one DONE."""
    if set(ev.extents) != set(contexts):
        raise LocalProtocolError("block status must answer every negotiated context")
    out = bytearray()
    items = sorted(ev.extents.items())
    for i, (ctx, extents) in enumerate(items):
        descs: list[tuple[int, int]] = []
        covered = 0
        for length, status in extents:
            if length <= 0:
                raise LocalProtocolError("zero-length extent")
            length = min(length, req.length - covered)
            descs.append((length, status))
            covered += length
            if covered >= req.length or req.flags & CMD_FLAG_REQ_ONE:
                break
        if not descs:
            raise LocalProtocolError("block status needs at least one extent")
        payload = struct.pack(">I", ctx) + b"".join(struct.pack(">II", *d) for d in descs)
        flag = REPLY_FLAG_DONE if i == len(items) - 1 else 0
        out += STRUCTURED_HDR.pack(
            STRUCTURED_REPLY_MAGIC, flag, ReplyType.BLOCK_STATUS, req.handle, len(payload)
        )
        out += payload
    return bytes(out)


def _materialize(req: Request, ev: ReadReply) -> bytes:
    out = bytearray(req.length)
    pos, used = 0, 0
    for hoff, hlen in sorted(ev.holes):
        rel = hoff - req.offset
        n = rel - pos
        out[pos:rel] = ev.data[used : used + n]
        used += n
        pos = rel + hlen
    out[pos:] = ev.data[used:]
    return bytes(out)
