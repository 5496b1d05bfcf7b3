"""Client role of the sans-IO NBD core (theory of operation: :mod:`edgevisor.proto.nbd`).

Zero-copy reads: ``send(Command(READ ...), into=view)`` names a caller-owned buffer for
the read's payload. When a data chunk (or a simple reply's payload) for that read starts,
the bytes already buffered are copied into ``view`` and the core enters *sink* mode:
:meth:`ClientConnection.get_buffer` then hands out the rest of the chunk's slice of
``view`` itself, so ``recv_into`` (or an SSL read) lands the payload at its destination
with no further copy. The :class:`Reply` of such a read carries no ``data``; the caller
must not reuse ``view`` until the read's reply arrived (or the connection died).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum, auto

from edgevisor.proto.nbd_wire import (
    DEFAULT_MAX_PAYLOAD,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_LEN,
    NBDMAGIC,
    NEED,
    OLDSTYLE_MAGIC,
    OPT_REPLY_MAGIC,
    OPTION_HDR,
    OPTION_REPLY_HDR,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HDR,
    STRUCTURED_REPLY_MAGIC,
    TF_READ_ONLY,
    Closed,
    Cmd,
    Command,
    Errno,
    ExportInfo,
    ExportList,
    HandshakeFailed,
    Info,
    LocalProtocolError,
    Need,
    Negotiated,
    Opt,
    RecvBuffer,
    RemoteProtocolError,
    Rep,
    Reply,
    ReplyType,
    StartTLS,
    parse_string,
)

__all__ = ["ClientConnection", "ClientEvent"]

ClientEvent = StartTLS | Negotiated | ExportList | HandshakeFailed | Reply | Closed


_GREETING = struct.Struct(">QQ")
_MAGIC = struct.Struct(">I")
_OFFSET = struct.Struct(">Q")


class _CState(Enum):
    GREETING = auto()
    OPTIONS = auto()
    TLS_WAIT = auto()
    EXPORT_NAME_REPLY = auto()
    TRANSMISSION = auto()
    CLOSED = auto()


@dataclass
class _Pending:
    cmd: Cmd
    offset: int
    length: int
    buf: bytearray | bytes | None = None
    into: memoryview | None = None
    covered: int = 0  # payload bytes placed in ``into`` (holes included)
    error: int = 0
    message: str = ""
    extents: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)


class ClientConnection:
    """Client role (see the module docstring)."""

    def __init__(
        self,
        export_name: str = "",
        *,
        structured: bool = True,
        contexts: tuple[str, ...] = (),
        tls: bool = False,
        list_exports: bool = False,
        max_reply: int = DEFAULT_MAX_PAYLOAD + 4096,
    ) -> None:
        self.export_name = export_name
        self.want_contexts = contexts
        self.max_reply = max_reply
        self.state = _CState.GREETING
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.size = 0
        self.transmission_flags = 0
        self.block_sizes: tuple[int, int, int] | None = None
        self._no_zeroes = False
        steps: list[Opt] = [Opt.STARTTLS] if tls else []
        if list_exports:
            steps.append(Opt.LIST)
        else:
            if structured:
                steps.append(Opt.STRUCTURED_REPLY)
                if contexts:
                    steps.append(Opt.SET_META_CONTEXT)
            steps.append(Opt.GO)
        self._steps = steps
        self._current: Opt | None = None
        self._listed: list[tuple[str, str]] = []
        self._in = RecvBuffer()
        self._out = bytearray()
        self._inflight: dict[int, _Pending] = {}
        # Sink mode (zero-copy read payload): the destination view still to be filled,
        # the handle it belongs to, and whether its chunk ends the reply.
        self._sink: memoryview | None = None
        self._sink_owner: int | None = None
        self._sink_done = False
        self._into_pending = 0  # reads in flight with a destination

    # ------------------------------------------------------------ public API

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._sink is not None:
                n = min(len(data), len(self._sink))
                self._sink[:n] = data[:n]
                self._sink_advance(n)
                data = data[n:]
            if data:
                self._in.feed(data)
        else:
            self._in.eof = True

    def get_buffer(self, minimum: int = 256 * 1024) -> memoryview:
        """Zero-copy receive: free space to ``recv_into``; then call :meth:`buffer_updated`.

        While a read payload with a destination is arriving, this is the rest of that
        destination (possibly shorter than ``minimum``).
        """
        if self._sink is not None:
            return self._sink
        buf = self._in.get_buffer(minimum)
        if self._into_pending:
            # Take no more than the next reply's head: its payload may go straight to
            # its destination (one more recv per reply instead of a copy of the payload).
            need = (STRUCTURED_HDR.size + 8 if self.structured else SIMPLE_REPLY.size) - (
                self._in.avail()
            )
            if need > 0:
                return buf[:need]
        return buf

    def buffer_updated(self, n: int) -> None:
        if self._sink is not None:
            self._sink_advance(n)
        else:
            self._in.buffer_updated(n)

    def _sink_advance(self, n: int) -> None:
        assert self._sink is not None
        self._sink = self._sink[n:] if n < len(self._sink) else None

    def tls_started(self) -> None:
        if self.state is not _CState.TLS_WAIT:
            raise LocalProtocolError("tls_started() outside TLS negotiation")
        self.state = _CState.OPTIONS
        self._next_step()

    @property
    def closed(self) -> bool:
        return self.state is _CState.CLOSED

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def sinking(self) -> bool:
        """A read's payload is arriving at its destination: :meth:`get_buffer` is the
        rest of it (a caller may fill it in a tight loop before :meth:`buffer_updated`)."""
        return self._sink is not None

    def next_event(self) -> ClientEvent | None:
        while self.state not in (_CState.CLOSED, _CState.TLS_WAIT):
            if self._sink is not None:
                if self._in.eof:
                    self.state = _CState.CLOSED
                    return Closed("server closed the connection mid-reply")
                return None
            if self._sink_owner is not None:
                done = self._sink_finished()
                if done is not None:
                    return done
                continue
            if self.state is _CState.GREETING:
                ev = self._greeting()
            elif self.state is _CState.OPTIONS:
                ev = self._option_reply()
            elif self.state is _CState.EXPORT_NAME_REPLY:
                ev = self._export_name_reply()
            else:
                ev = self._reply()
            if ev is NEED:
                if self._in.eof:
                    self.state = _CState.CLOSED
                    return Closed("server closed the connection")
                return None
            if ev is not None:
                assert not isinstance(ev, Need)
                return ev
        return None

    def send(self, event: Command, *, into: memoryview | None = None) -> bytes:
        """Bytes for a command; ``into`` (READ only, ``length`` bytes) receives the payload."""
        if self.state is not _CState.TRANSMISSION:
            raise LocalProtocolError("commands only in the transmission phase")
        if event.handle in self._inflight:
            raise LocalProtocolError(f"handle {event.handle} already in flight")
        if event.cmd is Cmd.WRITE and len(event.data) != event.length:
            raise LocalProtocolError("write length does not match its data")
        if event.cmd is Cmd.BLOCK_STATUS and not self.contexts:
            raise LocalProtocolError("no metadata context negotiated")
        if into is not None and (
            event.cmd is not Cmd.READ or into.nbytes != event.length or into.readonly
        ):
            raise LocalProtocolError("a read destination must be a writable view of its length")
        hdr = REQUEST.pack(
            REQUEST_MAGIC, event.flags, event.cmd, event.handle, event.offset, event.length
        )
        if event.cmd is Cmd.DISC:
            self.state = _CState.CLOSED
            return hdr
        self._inflight[event.handle] = _Pending(
            event.cmd, event.offset, event.length, into=into.cast("B") if into is not None else None
        )
        if into is not None:
            self._into_pending += 1
        return hdr + event.data if event.cmd is Cmd.WRITE else hdr

    # ------------------------------------------------------------ handshake

    def _fail(self, reply: int, message: str) -> HandshakeFailed:
        self.state = _CState.CLOSED
        return HandshakeFailed(reply, message)

    def _greeting(self) -> ClientEvent | Need | None:
        if self._in.avail() < 16:
            return NEED
        magic, second = self._in.peek(_GREETING)
        if magic != NBDMAGIC:
            raise RemoteProtocolError("not an NBD server")
        if second == OLDSTYLE_MAGIC:
            return self._fail(0, "oldstyle servers are not supported")
        if second != IHAVEOPT:
            raise RemoteProtocolError("bad greeting magic")
        if self._in.avail() < 18:
            return NEED
        self._in.skip(16)
        (hflags,) = struct.unpack(">H", self._in.take(2))
        if not hflags & FLAG_FIXED_NEWSTYLE:
            return self._fail(0, "server lacks fixed newstyle negotiation")
        cflags = FLAG_C_FIXED_NEWSTYLE
        if hflags & FLAG_NO_ZEROES:
            cflags |= FLAG_C_NO_ZEROES
            self._no_zeroes = True
        self._out += struct.pack(">I", cflags)
        self.state = _CState.OPTIONS
        self._next_step()
        return None

    def _send_option(self, opt: Opt, data: bytes = b"") -> None:
        self._current = opt
        self._out += OPTION_HDR.pack(IHAVEOPT, opt, len(data)) + data

    def _next_step(self) -> None:
        opt = self._steps.pop(0)
        name = self.export_name.encode()
        if opt is Opt.GO:
            self._send_option(
                opt, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
            )
        elif opt is Opt.SET_META_CONTEXT:
            body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(self.want_contexts))
            for c in self.want_contexts:
                raw = c.encode()
                body += struct.pack(">I", len(raw)) + raw
            self._send_option(opt, body)
        else:
            self._send_option(opt)

    def _option_reply(self) -> ClientEvent | Need | None:
        if self._in.avail() < OPTION_REPLY_HDR.size:
            return NEED
        magic, opt, rep, length = self._in.peek(OPTION_REPLY_HDR)
        if magic != OPT_REPLY_MAGIC or opt != self._current:
            raise RemoteProtocolError("bad option reply header")
        if length > MAX_OPTION_LEN:
            raise RemoteProtocolError("option reply too long")
        if self._in.avail() < OPTION_REPLY_HDR.size + length:
            return NEED
        self._in.skip(OPTION_REPLY_HDR.size)
        data = self._in.take(length)
        cur = self._current
        is_err = bool(rep & (1 << 31))
        if cur is Opt.STARTTLS:
            if rep != Rep.ACK:
                return self._fail(rep, "server refused STARTTLS")
            self.state = _CState.TLS_WAIT
            self._in = RecvBuffer()  # nothing after the ack counts until TLS is up
            return StartTLS()
        if cur is Opt.LIST:
            if rep == Rep.SERVER:
                listed, _ = _parse_or_raise(data, 0)
                self._listed.append((listed, ""))
                return None
            if rep != Rep.ACK:
                return self._fail(rep, "LIST refused")
            self._send_option(Opt.ABORT)
            self.state = _CState.CLOSED
            return ExportList(tuple(self._listed))
        if cur is Opt.STRUCTURED_REPLY:
            self.structured = rep == Rep.ACK
            if not self.structured and self._steps and self._steps[0] is Opt.SET_META_CONTEXT:
                self._steps.pop(0)
            self._next_step()
            return None
        if cur is Opt.SET_META_CONTEXT:
            if rep == Rep.META_CONTEXT:
                if len(data) < 4:
                    raise RemoteProtocolError("short META_CONTEXT reply")
                (cid,) = struct.unpack_from(">I", data)
                self.contexts[cid] = data[4:].decode("utf-8", "replace")
                return None
            if is_err:
                self.contexts = {}
            self._next_step()
            return None
        if cur is Opt.GO:
            if rep == Rep.INFO:
                self._go_info(data)
                return None
            if rep == Rep.ACK:
                return self._negotiated()
            if rep == Rep.ERR_UNSUP:
                raw = self.export_name.encode()
                self._out += OPTION_HDR.pack(IHAVEOPT, Opt.EXPORT_NAME, len(raw)) + raw
                self.state = _CState.EXPORT_NAME_REPLY
                return None
            return self._fail(rep, data.decode("utf-8", "replace") or "GO refused")
        raise RemoteProtocolError(f"unexpected reply to option {cur}")

    def _go_info(self, data: bytes) -> None:
        if len(data) < 2:
            raise RemoteProtocolError("short INFO reply")
        (typ,) = struct.unpack_from(">H", data)
        if typ == Info.EXPORT:
            if len(data) != 12:
                raise RemoteProtocolError("bad NBD_INFO_EXPORT length")
            _, self.size, self.transmission_flags = struct.unpack(">HQH", data)
        elif typ == Info.BLOCK_SIZE and len(data) == 14:
            _, mn, pref, mx = struct.unpack(">HIII", data)
            self.block_sizes = (mn, pref, mx)

    def _negotiated(self) -> Negotiated:
        self.state = _CState.TRANSMISSION
        info = ExportInfo(
            name=self.export_name,
            size=self.size,
            read_only=bool(self.transmission_flags & TF_READ_ONLY),
            contexts=tuple(self.contexts.values()),
            block_sizes=self.block_sizes or (1, 4096, DEFAULT_MAX_PAYLOAD),
        )
        return Negotiated(info, self.transmission_flags, self.structured, dict(self.contexts))

    def _export_name_reply(self) -> ClientEvent | Need | None:
        need = 10 if self._no_zeroes else 134
        if self._in.avail() < need:
            return NEED
        self.size, self.transmission_flags = struct.unpack(">QH", self._in.take(10))
        self._in.skip(need - 10)
        self.contexts = {}  # no GO: metadata contexts do not apply
        return self._negotiated()

    # ------------------------------------------------------------ replies

    def _reply(self) -> ClientEvent | Need | None:
        if self._in.avail() < 4:
            return NEED
        (magic,) = self._in.peek(_MAGIC)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple()
        if magic == STRUCTURED_REPLY_MAGIC and self.structured:
            return self._chunk()
        raise RemoteProtocolError(f"bad reply magic {magic:#x}")

    def _pending(self, handle: int) -> _Pending:
        p = self._inflight.get(handle)
        if p is None:
            raise RemoteProtocolError(f"reply for unknown handle {handle}")
        return p

    def _simple(self) -> ClientEvent | Need | None:
        if self._in.avail() < SIMPLE_REPLY.size:
            return NEED
        _, err, handle = self._in.peek(SIMPLE_REPLY)
        p = self._pending(handle)
        data = b""
        if p.cmd is Cmd.READ and err == 0:
            if self.structured:
                raise RemoteProtocolError("simple reply to a read with structured replies")
            if p.into is not None:
                self._in.skip(SIMPLE_REPLY.size)
                p.covered = p.length
                self._start_sink(handle, p.into, done=True)
                return None
            if self._in.avail() < SIMPLE_REPLY.size + p.length:
                return NEED
            self._in.skip(SIMPLE_REPLY.size)
            data = self._in.take(p.length)
        else:
            self._in.skip(SIMPLE_REPLY.size)
        if p.into is not None:  # an error reply to a read with a destination
            p.error = err
            return self._complete(handle, p)
        del self._inflight[handle]
        return Reply(handle, err, data)

    def _chunk(self) -> ClientEvent | Need | None:
        if self._in.avail() < STRUCTURED_HDR.size:
            return NEED
        _, flags, typ, handle, length = self._in.peek(STRUCTURED_HDR)
        if length > self.max_reply:
            raise RemoteProtocolError("reply chunk too long")
        if typ == ReplyType.OFFSET_DATA and length >= 8:
            p = self._pending(handle)
            if p.into is not None:
                return self._data_into(p, flags, handle, length)
        if self._in.avail() < STRUCTURED_HDR.size + length:
            return NEED
        p = self._pending(handle)
        self._in.skip(STRUCTURED_HDR.size)
        payload = self._in.take(length)
        self._apply_chunk(p, typ, payload)
        if not flags & REPLY_FLAG_DONE:
            return None
        return self._complete(handle, p)

    def _complete(self, handle: int, p: _Pending) -> Reply:
        del self._inflight[handle]
        data = b""
        if p.into is not None:
            self._into_pending -= 1
            if not p.error and p.covered == 0:
                p.into[:] = bytes(p.length)  # no chunk at all: zeroes, as without ``into``
            return Reply(handle, p.error, b"", p.extents, p.message)
        if p.cmd is Cmd.READ and not p.error:
            data = bytes(p.buf) if p.buf is not None else bytes(p.length)
        return Reply(handle, p.error, data, p.extents, p.message)

    # ------------------------------------------------------------ zero-copy payloads

    def _data_into(self, p: _Pending, flags: int, handle: int, length: int) -> Need | None:
        """An OFFSET_DATA chunk of a read with a destination: sink its payload there."""
        if self._in.avail() < STRUCTURED_HDR.size + 8:
            return NEED
        self._in.skip(STRUCTURED_HDR.size)
        (off,) = self._in.peek(_OFFSET)
        self._in.skip(8)
        n = length - 8
        if off < p.offset or off + n > p.offset + p.length or n == 0:
            raise RemoteProtocolError("data chunk outside the requested range")
        assert p.into is not None
        rel = off - p.offset
        self._first_chunk(p, rel, n)
        self._start_sink(handle, p.into[rel : rel + n], done=bool(flags & REPLY_FLAG_DONE))
        return None

    def _first_chunk(self, p: _Pending, rel: int, n: int) -> None:
        """Count ``n`` payload bytes; a read split in chunks starts from zeroes."""
        assert p.into is not None
        if p.covered == 0 and not (rel == 0 and n == p.length):
            p.into[:] = bytes(p.length)  # uncovered parts read as zeroes, as without ``into``
        p.covered += n

    def _start_sink(self, handle: int, view: memoryview, *, done: bool) -> None:
        buffered = min(self._in.avail(), len(view))
        if buffered:
            view[:buffered] = memoryview(self._in.b)[self._in.pos : self._in.pos + buffered]
            self._in.skip(buffered)
        self._sink_owner = handle
        self._sink_done = done
        self._sink = view[buffered:] if buffered < len(view) else None

    def _sink_finished(self) -> Reply | None:
        handle, done = self._sink_owner, self._sink_done
        assert handle is not None
        self._sink_owner = None
        if not done:
            return None
        return self._complete(handle, self._inflight[handle])

    def _apply_chunk(self, p: _Pending, typ: int, payload: bytes) -> None:
        if typ == ReplyType.NONE:
            if payload:
                raise RemoteProtocolError("NONE chunk with payload")
        elif typ in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
            if p.cmd is not Cmd.READ or len(payload) < 8:
                raise RemoteProtocolError("data chunk outside a read")
            (off,) = struct.unpack_from(">Q", payload)
            if typ == ReplyType.OFFSET_DATA:
                n = len(payload) - 8
            else:
                if len(payload) != 12:
                    raise RemoteProtocolError("bad hole chunk")
                (n,) = struct.unpack_from(">I", payload, 8)
            if off < p.offset or off + n > p.offset + p.length or n == 0:
                raise RemoteProtocolError("data chunk outside the requested range")
            if p.into is not None:  # a hole (data chunks with ``into`` go through the sink)
                self._first_chunk(p, off - p.offset, n)
                p.into[off - p.offset : off - p.offset + n] = bytes(n)
                return
            if typ == ReplyType.OFFSET_DATA:
                if p.buf is None and off == p.offset and n == p.length:
                    p.buf = payload[8:]  # the common single-chunk read: no copy
                    return
                if not isinstance(p.buf, bytearray):
                    old = p.buf
                    p.buf = bytearray(p.length) if old is None else bytearray(old)
                rel = off - p.offset
                p.buf[rel : rel + n] = payload[8:]
            elif isinstance(p.buf, bytes):
                buf = bytearray(p.buf)
                rel = off - p.offset
                buf[rel : rel + n] = bytes(n)
                p.buf = buf
        elif typ == ReplyType.BLOCK_STATUS:
            if p.cmd is not Cmd.BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
                raise RemoteProtocolError("bad block status chunk")
            (cid,) = struct.unpack_from(">I", payload)
            n = (len(payload) - 4) // 8
            vals = struct.unpack_from(f">{2 * n}I", payload, 4)
            p.extents[cid] = tuple(zip(vals[0::2], vals[1::2], strict=True))
        elif typ & (1 << 15):
            if len(payload) < 6:
                raise RemoteProtocolError("short error chunk")
            err, mlen = struct.unpack_from(">IH", payload)
            if not p.error:
                p.error = err or int(Errno.EINVAL)
                p.message = payload[6 : 6 + mlen].decode("utf-8", "replace")
        else:
            raise RemoteProtocolError(f"unknown reply chunk type {typ}")


def _parse_or_raise(data: bytes, pos: int) -> tuple[str, int]:
    try:
        return parse_string(data, pos)
    except (ValueError, UnicodeDecodeError) as e:
        raise RemoteProtocolError(f"malformed string: {e}") from None
