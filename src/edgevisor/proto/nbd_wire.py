"""NBD wire constants, events and errors shared by the server and client cores.

Numbers follow the NBD protocol document (``doc/proto.md`` of NetworkBlockDevice/nbd).
Events are frozen dataclasses; the cores in :mod:`edgevisor.proto.nbd` turn bytes into
them and them into bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from edgevisor.errors import EdgevisorError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OLDSTYLE_MAGIC = 0x00420281861253
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply flags
REPLY_FLAG_DONE = 1 << 0

# base:allocation status bits
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# edgevisor:sync status bit: the block is not present locally yet
SYNC_MISSING = 1 << 0

CTX_BASE_ALLOCATION = "base:allocation"
CTX_EDGEVISOR_SYNC = "edgevisor:sync"

MAX_STRING = 4096
MAX_OPTION_LEN = 64 * 1024
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


class Errno(IntEnum):
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


OPTION_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HDR = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_HDR = struct.Struct(">IHHQI")  # magic, flags, type, handle, length


class NBDProtocolError(EdgevisorError):
    """A protocol rule was broken."""

    code = "nbd_protocol_error"


class LocalProtocolError(NBDProtocolError):
    """This side (the application driving the core) broke a rule: a bug here."""


class RemoteProtocolError(NBDProtocolError):
    """The peer broke a rule; the connection cannot continue."""


# ----------------------------------------------------------------- shared data


@dataclass(frozen=True)
class ExportInfo:
    """What a server tells clients about one export."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    contexts: tuple[str, ...] = (CTX_BASE_ALLOCATION,)
    block_sizes: tuple[int, int, int] = (1, 4096, DEFAULT_MAX_PAYLOAD)
    multi_conn: bool = True

    def transmission_flags(self, structured: bool) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        if self.read_only:
            f |= TF_READ_ONLY
        if structured:
            f |= TF_SEND_DF
        if self.multi_conn:
            f |= TF_CAN_MULTI_CONN
        return f


# ------------------------------------------------------- events: handshake


@dataclass(frozen=True)
class StartTLS:
    """Both sides agreed on TLS: wrap the socket now, then call ``tls_started()``."""


@dataclass(frozen=True)
class Negotiated:
    """Handshake done, transmission phase begins (server and client)."""

    export: ExportInfo
    transmission_flags: int
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)  # id -> name


@dataclass(frozen=True)
class ExportList:
    """Client role: the names (and descriptions) a server listed."""

    exports: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class HandshakeFailed:
    """Client role: the server refused; ``reply`` is the option error (0 if closed)."""

    reply: int
    message: str


@dataclass(frozen=True)
class Closed:
    """The session is over (abort, disconnect, or a hard protocol violation)."""

    reason: str


# --------------------------------------------------- events: transmission


@dataclass(frozen=True)
class Request:
    """Server role: a valid request the application must perform and answer."""

    handle: int
    cmd: Cmd
    flags: int
    offset: int
    length: int
    data: bytes | memoryview = b""

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)


@dataclass(frozen=True)
class ReadReply:
    """Server role: answer a READ. ``holes`` lists ``(offset, length)`` reading as zero
    (sent as hole chunks when structured replies are on; ``data`` covers the rest
    in order, concatenated)."""

    handle: int
    data: bytes
    holes: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Done:
    """Server role: the command succeeded (no payload)."""

    handle: int


@dataclass(frozen=True)
class ErrorReply:
    handle: int
    error: Errno
    message: str = ""


@dataclass(frozen=True)
class BlockStatusReply:
    """Server role: per context id, extents ``(length, status flags)`` from the offset."""

    handle: int
    extents: dict[int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class Command:
    """Client role: a request to send."""

    handle: int
    cmd: Cmd
    offset: int = 0
    length: int = 0
    flags: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class Reply:
    """Client role: the complete answer to one command."""

    handle: int
    error: int
    data: bytes = b""
    extents: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    message: str = ""


# ----------------------------------------------------------- core helpers


class RecvBuffer:
    """Receive buffer: a bytearray with read/write positions that never shrinks.

    Bytes come in either copied (:meth:`feed`) or written in place by the caller
    (:meth:`get_buffer` + :meth:`buffer_updated`, the shape of
    :class:`asyncio.BufferedProtocol`). The array is never resized while a caller may
    hold a view of it: growth swaps in a new array, compaction moves bytes within.
    """

    __slots__ = ("_view", "b", "end", "eof", "pos")

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.b = bytearray(capacity)
        self._view = memoryview(self.b)  # reused by get_buffer (one object less per recv)
        self.pos = 0
        self.end = 0
        self.eof = False

    def _make_room(self, n: int) -> None:
        if len(self.b) - self.end >= n:
            return
        live = self.end - self.pos
        if live + n <= len(self.b) and self.pos >= live:
            self.b[0:live] = self.b[self.pos : self.end]  # same length: no resize
        else:
            new = bytearray(max(2 * len(self.b), live + n))
            new[0:live] = self.b[self.pos : self.end]
            self.b = new
            self._view = memoryview(new)
        self.pos, self.end = 0, live

    def feed(self, data: bytes) -> None:
        self._make_room(len(data))
        self.b[self.end : self.end + len(data)] = data
        self.end += len(data)

    def get_buffer(self, minimum: int = 256 * 1024) -> memoryview:
        """Writable free space of at least ``minimum`` bytes at the end."""
        if self.pos == self.end:
            self.pos = self.end = 0
        if len(self.b) - self.end < minimum:
            self._make_room(minimum)
        return self._view[self.end :]

    def buffer_updated(self, n: int) -> None:
        self.end += n

    def avail(self) -> int:
        return self.end - self.pos

    def peek(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack_from(self.b, self.pos)

    def take(self, n: int) -> bytes:
        out = bytes(memoryview(self.b)[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self.pos += n


def opt_reply(opt: int, rep: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HDR.pack(OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload


def parse_string(data: bytes, pos: int) -> tuple[str, int]:
    """A 32-bit length-prefixed UTF-8 string; ValueError when malformed."""
    if pos + 4 > len(data):
        raise ValueError("truncated string length")
    (n,) = struct.unpack_from(">I", data, pos)
    if n > MAX_STRING or pos + 4 + n > len(data):
        raise ValueError("string too long or truncated")
    raw = data[pos + 4 : pos + 4 + n]
    if b"\0" in raw:
        raise ValueError("NUL in string")
    return raw.decode("utf-8"), pos + 4 + n


class Need:
    """Sentinel: more input is needed."""


NEED = Need()
