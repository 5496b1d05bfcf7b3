"""Server role of the sans-IO NBD core (theory of operation: :mod:`edgevisor.proto.nbd`)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import Enum, auto
from typing import Protocol

from edgevisor.proto.nbd_replies import (
    block_status_reply,
    error_reply,
    ok_reply,
    read_frame,
    read_header,
    read_reply,
)
from edgevisor.proto.nbd_wire import (
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    DEFAULT_MAX_PAYLOAD,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_LEN,
    NBDMAGIC,
    NEED,
    OPTION_HDR,
    REQUEST,
    REQUEST_MAGIC,
    STRUCTURED_HDR,
    BlockStatusReply,
    Closed,
    Cmd,
    Done,
    Errno,
    ErrorReply,
    ExportInfo,
    Info,
    LocalProtocolError,
    Need,
    Negotiated,
    Opt,
    ReadReply,
    RecvBuffer,
    Rep,
    Request,
    StartTLS,
    opt_reply,
    parse_string,
)

__all__ = ["ExportCatalog", "ServerConnection", "ServerEvent", "TLSPolicy"]

ServerEvent = StartTLS | Negotiated | Request | Closed


class ExportCatalog(Protocol):
    """What the server core may look up (pure; the adapter applies auth in here)."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def names(self) -> list[tuple[str, str]]: ...


class TLSPolicy(Enum):
    OFF = auto()  # STARTTLS refused (NBD_REP_ERR_POLICY)
    OPTIONAL = auto()  # STARTTLS accepted, plain sessions too
    REQUIRED = auto()  # every option but STARTTLS/ABORT gets NBD_REP_ERR_TLS_REQD before it


# Command flags a request may carry (FUA is accepted everywhere, per the spec).
_ALLOWED_FLAGS = {
    Cmd.READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: CMD_FLAG_FUA,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    Cmd.BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}


# Hot-path constants (see _request): bound methods and plain ints, looked up once.
_unpack_request = REQUEST.unpack_from
_REQUEST_SIZE = REQUEST.size
_CMD_WRITE = int(Cmd.WRITE)
_CMDS: dict[int, Cmd] = {int(c): c for c in Cmd}
# A data chunk header and its offset field, packed in one call.
_DATA_CHUNK_HDR = struct.Struct(STRUCTURED_HDR.format + "Q")


class _SState(Enum):
    GREETING = auto()
    OPTIONS = auto()
    TLS_WAIT = auto()
    TRANSMISSION = auto()
    CLOSED = auto()


class ServerConnection:
    """Server role (see the module docstring)."""

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        tls: TLSPolicy = TLSPolicy.OFF,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        zero_copy: bool = False,
    ) -> None:
        """``zero_copy``: a WRITE's ``Request.data`` is a memoryview into the receive
        buffer, valid only until the next ``get_buffer``/``receive_data`` call -- the
        application writes it at once or copies it."""
        self.catalog = catalog
        self.zero_copy = zero_copy
        self.tls_policy = tls
        self.max_payload = max_payload
        self.state = _SState.GREETING
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.export: ExportInfo | None = None
        self.contexts: dict[int, str] = {}
        self._meta_export: str | None = None
        self._in = RecvBuffer()
        self._out = bytearray(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        self._discard = 0
        self._inflight: dict[int, Request] = {}
        self._read_flags = _ALLOWED_FLAGS[Cmd.READ] & ~CMD_FLAG_DF  # set again on transmission

    # ------------------------------------------------------------ public API

    def data_to_send(self) -> bytes:
        if not self._out:  # the common case in transmission: no allocation
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if data:
            self._in.feed(data)
        else:
            self._in.eof = True

    def get_buffer(self, minimum: int = 256 * 1024) -> memoryview:
        """Zero-copy receive: free space to ``recv_into``; then call :meth:`buffer_updated`."""
        return self._in.get_buffer(minimum)

    def buffer_updated(self, n: int) -> None:
        self._in.buffer_updated(n)

    def tls_started(self) -> None:
        if self.state is not _SState.TLS_WAIT:
            raise LocalProtocolError("tls_started() outside TLS negotiation")
        self.tls_active = True
        self.state = _SState.OPTIONS

    @property
    def closed(self) -> bool:
        return self.state is _SState.CLOSED

    def buffered(self) -> int:
        """Received bytes not parsed yet (0: every complete request was returned)."""
        return self._in.end - self._in.pos

    def next_event(self) -> ServerEvent | None:
        if self.state is _SState.TRANSMISSION and not self._discard:
            # Hot path: the next request of an established session.
            first = self._request()
            if isinstance(first, Need):
                return self._eof_or_none()
            if first is not None:
                return first
        while self.state is not _SState.CLOSED:
            if self._discard:
                n = min(self._discard, self._in.avail())
                self._in.skip(n)
                self._discard -= n
                if self._discard:
                    return self._eof_or_none()
            if self.state is _SState.GREETING:
                ev = self._greeting()
            elif self.state is _SState.OPTIONS:
                ev = self._option()
            elif self.state is _SState.TRANSMISSION:
                ev = self._request()
            else:  # TLS_WAIT: the application must call tls_started() first
                return None
            if ev is NEED:
                return self._eof_or_none()
            if ev is not None:
                assert not isinstance(ev, Need)
                return ev
        return None

    def send(self, event: ReadReply | Done | ErrorReply | BlockStatusReply) -> bytes:
        """Encode the application's answer to a :class:`Request`."""
        req = self._inflight.pop(event.handle, None)
        if req is None:
            raise LocalProtocolError(f"no request in flight with handle {event.handle}")
        if isinstance(event, ReadReply):
            if req.cmd is not Cmd.READ:
                raise LocalProtocolError("ReadReply to a non-read request")
            return self._read_reply(req, event)
        if isinstance(event, BlockStatusReply):
            if req.cmd is not Cmd.BLOCK_STATUS:
                raise LocalProtocolError("BlockStatusReply to a non-block-status request")
            return self._block_status_reply(req, event)
        if isinstance(event, ErrorReply):
            return self._error_bytes(req.handle, event.error, event.message)
        if req.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
            raise LocalProtocolError(f"Done is not an answer to {req.cmd.name}")
        return self._ok_bytes(req.handle)

    def read_reply_header(self, handle: int) -> bytes:
        """Answer a READ with one data chunk whose payload the caller sends right after
        these header bytes (exactly the request's length; e.g. straight from a file)."""
        return read_header(self._pop_read(handle), self.structured)

    def read_reply_frame(self, handle: int) -> tuple[bytearray, int]:
        """Answer a READ with one data chunk built in place: returns ``(frame, start)``,
        the whole reply with its header filled in; the caller writes exactly the
        request's length of payload at ``frame[start:]`` (e.g. ``os.preadv`` into it)
        and sends ``frame`` -- one buffer, one ``send``, no concatenation."""
        return read_frame(self._pop_read(handle), self.structured)

    def _pop_read(self, handle: int) -> Request:
        req = self._inflight.pop(handle, None)
        if req is None or req.cmd is not Cmd.READ:
            if req is not None:  # not ours to answer this way: keep it answerable
                self._inflight[handle] = req
            raise LocalProtocolError(f"no read in flight with handle {handle}")
        return req

    # ------------------------------------------------------------ handshake

    def _eof_or_none(self) -> ServerEvent | None:
        if self._in.eof:
            return self._close("peer closed the connection")
        return None

    def _close(self, reason: str) -> Closed:
        # In-flight requests may still be answered (a DISC lets them finish).
        self.state = _SState.CLOSED
        return Closed(reason)

    def _greeting(self) -> ServerEvent | Need | None:
        if self._in.avail() < 4:
            return NEED
        (flags,) = struct.unpack(">I", self._in.take(4))
        if not flags & FLAG_C_FIXED_NEWSTYLE or flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            # Unknown client flags: the spec says the server MUST close.
            return self._close(f"unsupported client flags {flags:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.state = _SState.OPTIONS
        return None

    def _option(self) -> ServerEvent | Need | None:
        if self._in.avail() < OPTION_HDR.size:
            return NEED
        magic, opt, length = self._in.peek(OPTION_HDR)
        if magic != IHAVEOPT:
            return self._close("bad option magic")
        if length > MAX_OPTION_LEN:
            self._in.skip(OPTION_HDR.size)
            self._discard = length
            self._out += opt_reply(opt, Rep.ERR_TOO_BIG)
            return None
        if self._in.avail() < OPTION_HDR.size + length:
            return NEED
        self._in.skip(OPTION_HDR.size)
        data = self._in.take(length)
        return self._handle_option(opt, data)

    def _handle_option(self, opt: int, data: bytes) -> ServerEvent | None:
        if (
            self.tls_policy is TLSPolicy.REQUIRED
            and not self.tls_active
            and opt not in (Opt.STARTTLS, Opt.ABORT)
        ):
            if opt == Opt.EXPORT_NAME:
                return self._close("EXPORT_NAME before required TLS")
            self._out += opt_reply(opt, Rep.ERR_TLS_REQD)
            return None
        handler = self._OPTION_HANDLERS.get(opt)
        if handler is None:
            self._out += opt_reply(opt, Rep.ERR_UNSUP)
            return None
        try:
            return handler(self, opt, data)
        except (ValueError, UnicodeDecodeError, struct.error):
            if opt == Opt.EXPORT_NAME:
                return self._close("malformed EXPORT_NAME")
            self._out += opt_reply(opt, Rep.ERR_INVALID)
            return None

    def _opt_abort(self, opt: int, data: bytes) -> ServerEvent | None:
        self._out += opt_reply(opt, Rep.ACK)
        return self._close("client aborted")

    def _opt_list(self, opt: int, data: bytes) -> ServerEvent | None:
        if data:
            raise ValueError("LIST carries no data")
        for name, _desc in self.catalog.names():
            raw = name.encode()
            self._out += opt_reply(opt, Rep.SERVER, struct.pack(">I", len(raw)) + raw)
        self._out += opt_reply(opt, Rep.ACK)
        return None

    def _opt_starttls(self, opt: int, data: bytes) -> ServerEvent | None:
        if data or self.tls_active:
            raise ValueError("STARTTLS with data or repeated")
        if self.tls_policy is TLSPolicy.OFF:
            self._out += opt_reply(opt, Rep.ERR_POLICY)
            return None
        self._out += opt_reply(opt, Rep.ACK)
        self.state = _SState.TLS_WAIT
        # Plain text the client pipelined after STARTTLS must not count as protected;
        # whatever arrives from here on comes through the TLS layer.
        self._in = RecvBuffer()
        return StartTLS()

    def _opt_structured(self, opt: int, data: bytes) -> ServerEvent | None:
        if data:
            raise ValueError("STRUCTURED_REPLY carries no data")
        self.structured = True
        self._out += opt_reply(opt, Rep.ACK)
        return None

    def _opt_export_name(self, opt: int, data: bytes) -> ServerEvent | None:
        name = data.decode("utf-8")
        info = self.catalog.lookup(name)
        if info is None:
            return self._close(f"unknown export {name!r}")
        # Without GO there is no structured reply negotiation for this export's contexts.
        if self._meta_export != name:
            self.contexts = {}
        flags = info.transmission_flags(self.structured)
        self._out += struct.pack(">QH", info.size, flags)
        if not self.no_zeroes:
            self._out += bytes(124)
        return self._enter_transmission(info, flags)

    def _enter_transmission(self, info: ExportInfo, flags: int) -> Negotiated:
        self.export = info
        self.state = _SState.TRANSMISSION
        self._read_flags = _ALLOWED_FLAGS[Cmd.READ] & ~(0 if self.structured else CMD_FLAG_DF)
        return Negotiated(info, flags, self.structured, dict(self.contexts))

    def _opt_info_go(self, opt: int, data: bytes) -> ServerEvent | None:
        name, pos = parse_string(data, 0)
        if pos + 2 > len(data):
            raise ValueError("truncated info count")
        (n,) = struct.unpack_from(">H", data, pos)
        if pos + 2 + 2 * n != len(data):
            raise ValueError("info request list length mismatch")
        wanted = set(struct.unpack_from(f">{n}H", data, pos + 2))
        info = self.catalog.lookup(name)
        if info is None:
            self._out += opt_reply(opt, Rep.ERR_UNKNOWN, b"unknown export")
            return None
        flags = info.transmission_flags(self.structured)
        self._out += opt_reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, info.size, flags))
        if Info.NAME in wanted:
            self._out += opt_reply(opt, Rep.INFO, struct.pack(">H", Info.NAME) + name.encode())
        if Info.DESCRIPTION in wanted and info.description:
            desc = info.description.encode()
            self._out += opt_reply(opt, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + desc)
        if Info.BLOCK_SIZE in wanted:
            mn, pref, mx = info.block_sizes
            self._out += opt_reply(
                opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, mn, pref, mx)
            )
        self._out += opt_reply(opt, Rep.ACK)
        if opt == Opt.INFO:
            return None
        if self._meta_export != name:
            self.contexts = {}
        return self._enter_transmission(info, flags)

    def _opt_meta(self, opt: int, data: bytes) -> ServerEvent | None:
        name, pos = parse_string(data, 0)
        if pos + 4 > len(data):
            raise ValueError("truncated query count")
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(n):
            q, pos = parse_string(data, pos)
            queries.append(q)
        if pos != len(data):
            raise ValueError("trailing bytes after queries")
        if not self.structured:
            self._out += opt_reply(opt, Rep.ERR_INVALID, b"structured replies first")
            return None
        info = self.catalog.lookup(name)
        if info is None:
            self._out += opt_reply(opt, Rep.ERR_UNKNOWN, b"unknown export")
            return None
        ids = {ctx: i + 1 for i, ctx in enumerate(info.contexts)}
        chosen: list[str] = []
        if opt == Opt.LIST_META_CONTEXT and not queries:
            chosen = list(info.contexts)
        for q in queries:
            for ctx in info.contexts:
                wildcard = opt == Opt.LIST_META_CONTEXT and q.endswith(":")
                hit = ctx == q or (wildcard and ctx.startswith(q))
                if hit and ctx not in chosen:
                    chosen.append(ctx)
        for ctx in chosen:
            raw = ctx.encode()
            self._out += opt_reply(opt, Rep.META_CONTEXT, struct.pack(">I", ids[ctx]) + raw)
        self._out += opt_reply(opt, Rep.ACK)
        if opt == Opt.SET_META_CONTEXT:
            self.contexts = {ids[c]: c for c in chosen}
            self._meta_export = name
        return None

    _OPTION_HANDLERS: dict[int, Callable[[ServerConnection, int, bytes], ServerEvent | None]] = {
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.STRUCTURED_REPLY: _opt_structured,
        Opt.EXPORT_NAME: _opt_export_name,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.LIST_META_CONTEXT: _opt_meta,
        Opt.SET_META_CONTEXT: _opt_meta,
    }

    # ------------------------------------------------------------ transmission

    def _request(self) -> ServerEvent | Need | None:
        # The per-request hot path (a QD1 4 KiB read pays for every line here): the
        # buffer's fields are read directly and the command is a dict lookup, not an
        # Enum call.
        inb = self._in
        pos = inb.pos
        avail = inb.end - pos
        if avail < _REQUEST_SIZE:
            return NEED
        magic, flags, ctype, handle, offset, length = _unpack_request(inb.b, pos)
        if magic != REQUEST_MAGIC:
            return self._close("bad request magic")
        data: bytes | memoryview = b""
        if ctype != _CMD_WRITE:
            inb.pos = pos + _REQUEST_SIZE
        elif length <= self.max_payload:
            if avail < _REQUEST_SIZE + length:
                return NEED
            start = pos + _REQUEST_SIZE
            if self.zero_copy:
                data = memoryview(inb.b)[start : start + length]
            else:
                data = bytes(memoryview(inb.b)[start : start + length])
            inb.pos = start + length
        else:
            inb.pos = pos + _REQUEST_SIZE
            self._discard = length  # oversized write: skip the payload, reply EINVAL
        cmd = _CMDS.get(ctype)
        err = self._validate(cmd, flags, offset, length)
        if err is not None:
            self._out += self._error_bytes(handle, err, "")
            return None
        assert cmd is not None
        if cmd is Cmd.DISC:
            return self._close("client disconnected")
        req = Request(handle, cmd, flags, offset, length, data)
        self._inflight[handle] = req
        return req

    def _validate(self, cmd: Cmd | None, flags: int, offset: int, length: int) -> Errno | None:
        assert self.export is not None
        if cmd is Cmd.READ:  # hot path: the same checks as the general ones below
            if flags & ~self._read_flags or not 0 < length <= self.max_payload:
                return Errno.EINVAL
            return Errno.EINVAL if offset + length > self.export.size else None
        if cmd is None:
            return Errno.EINVAL
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:  # CACHE and friends are not advertised
            return Errno.EINVAL
        if not self.structured:
            allowed &= ~CMD_FLAG_DF
        if flags & ~allowed:
            return Errno.EINVAL
        if cmd in (Cmd.DISC, Cmd.FLUSH):
            # The spec makes the client send zero offset and length here.
            return Errno.EINVAL if offset or length else None
        if cmd is Cmd.BLOCK_STATUS and not self.contexts:
            return Errno.EINVAL
        if length == 0:
            return Errno.EINVAL
        if cmd in (Cmd.READ, Cmd.WRITE) and length > self.max_payload:
            return Errno.EINVAL
        if self.export.read_only and cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
            return Errno.EPERM
        if offset + length > self.export.size:
            return Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        return None

    def _ok_bytes(self, handle: int) -> bytes:
        return ok_reply(handle, self.structured)

    def _error_bytes(self, handle: int, err: Errno, message: str) -> bytes:
        return error_reply(handle, err, message, self.structured)

    def _read_reply(self, req: Request, ev: ReadReply) -> bytes:
        return read_reply(req, ev, self.structured)

    def _block_status_reply(self, req: Request, ev: BlockStatusReply) -> bytes:
        return block_status_reply(req, ev, self.contexts)
