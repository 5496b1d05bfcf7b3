"""Sans-IO nf_tables element batches: a :class:`~edgevisor.network.dp_core.Batch`'s element
part as the bytes of ONE nfnetlink batch, and the kernel's acks back into a result.

Why: libnftables parses text, re-reads its cache (table, sets and, for interval sets,
their elements: ~7 netlink round trips) and only then sends the batch; the commit of a
one-record remap cost 1.2-1.3 ms that way. Here the batch is encoded directly (tens of
microseconds) and sent with one ``sendmsg``; the socket belongs to the caller
(:class:`~edgevisor.network.nft.NftSocket`). libnftables still makes tables, rebuilds and
lists; only element updates of existing sets go this way.

Wire format (kernel ``include/uapi/linux/netfilter/{nfnetlink,nf_tables}.h``)::

    NFNL_MSG_BATCH_BEGIN  (res_id = NFNL_SUBSYS_NFTABLES)
    NFT_MSG_DELSETELEM / NFT_MSG_NEWSETELEM   one per (operation, set) (and 64 KiB)
        NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET,
        NFTA_SET_ELEM_LIST_ELEMENTS { NFTA_LIST_ELEM { KEY {VALUE}, [KEY_END {VALUE}],
                                                       [DATA {VALUE}] } ... }
    NFNL_MSG_BATCH_END    (NLM_F_ACK: its ack closes the exchange)

The kernel runs the whole batch as one transaction: all of it or none of it. Messages go in
the order :func:`~edgevisor.network.dp_core.render_batch` writes its lines, so both paths
make the same transaction. Key bytes follow what ``nft --debug=netlink`` sends (the unit
tests hold captures): addresses, ethertypes and ports big-endian; marks, ``ct mark`` and
``ct zone`` host-endian, except in interval sets, where nft stores them big-endian (its
rules convert the register with a ``byteorder`` expression before the lookup); each field
of a concatenation padded to 4 bytes; an ``ifname`` is 16 bytes, NUL-padded. A range of a
concatenated interval set (pipapo) is ``KEY`` = the low ends, ``KEY_END`` = the high ends.

Acks: the kernel answers a refused message whether or not it asked for an ack (errno,
the message's sequence number and, with ``NETLINK_EXT_ACK``, the offset of the element
attribute it refused: that names the failing element), and then aborts the whole batch
without acking ``BATCH_END``. So by default only ``BATCH_END`` carries ``NLM_F_ACK``: a
batch that applied costs one ack to read; ``ack_each`` asks for one per message.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from edgevisor.network.dp_core import Batch, fence_ops
from edgevisor.network.nft import NftError
from edgevisor.network.nft_schema import (
    _NLA,
    NFTA_DATA_VALUE,
    NLA_F_NESTED,
    SCHEMAS,
    SetSchema,
    UnsupportedBatch,
    parse_declaration,
    schemas,
)

__all__ = [
    "AckReader",
    "EncodedBatch",
    "MessageInfo",
    "NetlinkBatchError",
    "SetSchema",
    "UnsupportedBatch",
    "encode_batch",
    "encode_elements",
    "encode_empty",
    "iter_messages",
    "parse_declaration",
    "schemas",
]

# --- constants (kernel uapi) -------------------------------------------------------------
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CAPPED = 0x100  # in an ack: the original message was cut to its header
NLM_F_ACK_TLVS = 0x200  # in an ack: extended-ack attributes follow
NLM_F_CREATE = 0x400
NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
FAMILIES = {"ip": NFPROTO_IPV4, "ip6": NFPROTO_IPV6}
_NEWSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
_DELSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid (host order)
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, res_id (big-endian)
_MSG_HDR = struct.Struct("=IHHIIBBH")  # nlmsghdr + nfgenmsg of an element message
_HEADS: dict[tuple[str, str], bytes] = {}  # (table, set) -> their two attributes
# An element list is one nested attribute: its length field is 16 bits.
_MAX_ELEMENTS_BYTES = 60_000


class NetlinkBatchError(NftError):
    """The kernel refused a netlink batch; nothing of it was applied.

    ``mapped`` is true when the refusal names an element of the batch with an errno the
    batch itself explains (ENOENT: deleting a missing element, EEXIST: adding a clashing
    one); the text path would be refused the same way. Otherwise (an unexpected kernel,
    EINVAL, ...) the caller may retry the batch once through libnftables.
    ``fallback_ok`` is false when it is unknown whether the kernel applied the batch.
    """

    code = "nft_netlink_failed"

    def __init__(
        self,
        message: str,
        *,
        errno: int,
        set_name: str | None = None,
        element: str | None = None,
        op: str | None = None,
        fallback_ok: bool = True,
    ) -> None:
        super().__init__(
            message, details={"errno": errno, "set": set_name, "element": element, "op": op}
        )
        self.errno = errno
        self.set_name = set_name
        self.element = element
        self.op = op
        self.fallback_ok = fallback_ok

    @property
    def mapped(self) -> bool:
        return self.element is not None and self.errno in (_errno.ENOENT, _errno.EEXIST)


# --- encoding ----------------------------------------------------------------------------


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * (-n % 4)


def _value(kind: int, value: bytes) -> bytes:
    """``kind { NFTA_DATA_VALUE value }`` (nested)."""
    n = len(value)
    pad = -n % 4
    return (
        _NLA.pack(8 + n + pad, kind | NLA_F_NESTED)
        + _NLA.pack(4 + n, NFTA_DATA_VALUE)
        + value
        + b"\0" * pad
    )


def encode_elements(
    schema: SetSchema, items: Sequence[tuple[str, str | None]], *, with_data: bool
) -> list[bytes]:
    """One ``NFTA_LIST_ELEM`` per rendered (key, data) item, numbered from 1 as libnftnl
    does (the kernel does not look at the number); data ignored unless ``with_data`` (a
    delete names keys only)."""
    lay = schema.layout
    has_data = with_data and schema.data is not None
    pack = _NLA.pack
    head = lay.size if has_data else lay.size_nodata
    out = []
    for i, (key_text, data_text) in enumerate(items, 1):
        key, key_end = schema.key_bytes(key_text)
        parts = [pack(head, (i & 0x7FFF) | NLA_F_NESTED), lay.key_head, key, lay.key_pad]
        if key_end is not None:
            parts += (lay.end_head, key_end, lay.key_pad)
        if has_data:
            if data_text is None:
                raise UnsupportedBatch(f"{schema.name}: element {key_text!r} has no data")
            parts += (lay.data_head, schema.data_bytes(data_text), lay.data_pad)
        elif with_data and data_text is not None:
            raise UnsupportedBatch(f"{schema.name} is a set: {key_text!r} has data")
        out.append(b"".join(parts))
    return out


class MessageInfo(NamedTuple):
    """What one message of a batch holds, to name what the kernel refused (offsets are
    worked out only then: a batch that applies never needs them)."""

    seq: int
    op: str  # "add" or "delete"
    set_name: str
    first: int  # offset of the first element attribute in the message
    keys: Sequence[str]  # the elements' rendered keys
    encoded: Sequence[bytes]  # the elements' attributes

    @property
    def elements(self) -> list[tuple[int, int, str]]:
        """(start, end offset in the message, key) of each element."""
        out, pos = [], self.first
        for key, e in zip(self.keys, self.encoded, strict=True):
            out.append((pos, pos + len(e), key))
            pos += len(e)
        return out

    def element_at(self, offset: int) -> str | None:
        for start, end, key in self.elements:
            if start <= offset < end:
                return key
        return None


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """The bytes of one nfnetlink batch and what each of its messages holds."""

    data: bytes
    begin_seq: int
    end_seq: int
    messages: Mapping[int, MessageInfo] = field(default_factory=dict)

    @property
    def message_count(self) -> int:
        return len(self.messages) + 2


class _Builder:
    def __init__(self, table: str, seq: int, ack_each: bool = False) -> None:
        self.table_name = table
        self.table = _nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        self.ack = NLM_F_ACK if ack_each else 0
        self.seq = seq
        self.parts = [
            self._header(NFNL_MSG_BATCH_BEGIN, 20, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES)
        ]
        self.begin_seq = seq
        self.messages: dict[int, MessageInfo] = {}

    def _header(self, mtype: int, length: int, flags: int, family: int, res_id: int) -> bytes:
        h = _HDR.pack(length, mtype, flags, self.seq, 0) + _NFGEN.pack(family, 0, res_id)
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return h

    def add(self, op: str, schema: SetSchema, items: Sequence[tuple[str, str | None]]) -> None:
        if not items:
            return
        elems = encode_elements(schema, items, with_data=op == "add")
        keys = [k for k, _ in items]
        size = sum(map(len, elems))
        if size <= _MAX_ELEMENTS_BYTES:
            self._message(op, schema, keys, elems, size)
            return
        first = 0
        while first < len(elems):
            size, last = len(elems[first]), first + 1
            while last < len(elems) and size + len(elems[last]) <= _MAX_ELEMENTS_BYTES:
                size += len(elems[last])
                last += 1
            if 4 + size > 0xFFFF:
                raise UnsupportedBatch(f"{schema.name}: one element exceeds a message")
            # Numbered from 1 in each message.
            chunk = [
                _NLA.pack(len(e), (j & 0x7FFF) | NLA_F_NESTED) + e[4:]
                for j, e in enumerate(elems[first:last], 1)
            ]
            self._message(op, schema, keys[first:last], chunk, size)
            first = last

    def _message(
        self, op: str, schema: SetSchema, keys: Sequence[str], elems: list[bytes], size: int
    ) -> None:
        head = _HEADS.get((self.table_name, schema.name))
        if head is None:
            head = _HEADS[(self.table_name, schema.name)] = self.table + _nla(
                NFTA_SET_ELEM_LIST_SET, schema.name.encode() + b"\0"
            )
        add = op == "add"
        first = 24 + len(head)  # nlmsghdr, nfgenmsg, head, the list's attribute header
        seq = self.seq
        self.seq = (seq + 1) & 0xFFFFFFFF
        self.parts += (
            _MSG_HDR.pack(
                first + size,
                _NEWSETELEM if add else _DELSETELEM,
                NLM_F_REQUEST | self.ack | (NLM_F_CREATE if add else 0),
                seq,
                0,
                FAMILIES[schema.family],
                0,
                0,  # res_id 0: no byte order to mind
            ),
            head,
            _NLA.pack(4 + size, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED),
        )
        self.parts += elems
        self.messages[seq] = MessageInfo(seq, op, schema.name, first, keys, elems)

    def finish(self) -> EncodedBatch:
        end_seq = self.seq
        self.parts.append(
            self._header(NFNL_MSG_BATCH_END, 20, NLM_F_REQUEST | NLM_F_ACK, 0, NFNL_SUBSYS_NFTABLES)
        )
        return EncodedBatch(b"".join(self.parts), self.begin_seq, end_seq, self.messages)


def encode_empty(seq: int) -> EncodedBatch:
    """A batch with no message between BEGIN and END (a probe: an empty transaction)."""
    return _Builder("", seq).finish()


def _schema(name: str, known: Mapping[str, SetSchema]) -> SetSchema:
    try:
        return known[name]
    except KeyError:
        raise UnsupportedBatch(f"no schema for set {name!r}") from None


def encode_batch(
    batch: Batch,
    table: str,
    seq: int,
    *,
    ack_each: bool = False,
    known: Mapping[str, SetSchema] | None = None,
) -> EncodedBatch:
    """The element part of ``batch`` as one nfnetlink batch, messages numbered from
    ``seq``; the same operations in the same order as ``render_batch``. Raises
    :class:`UnsupportedBatch` for a set or key it cannot encode.

    ``ack_each`` sets ``NLM_F_ACK`` on every element message. Off by default: the kernel
    reports a refused message whether or not it asked for an ack (with its sequence number
    and the offset of the refused element), so errors are attributable either way, and
    the only success ack is then the one of ``BATCH_END``: one ``recv`` instead of one
    per message (~5 us each)."""
    known = SCHEMAS if known is None else known
    b = _Builder(table, seq, ack_each)
    for name, keys in fence_ops(batch, "delete"):  # the maps', then the fence's
        b.add("delete", _schema(name, known), [(k, None) for k in keys])
    for name, items in sorted(batch.adds.items()):
        b.add("add", _schema(name, known), items)
    for name, keys in fence_ops(batch, "add"):
        b.add("add", _schema(name, known), [(k, None) for k in keys])
    return b.finish()


# --- acks --------------------------------------------------------------------------------


class AckReader:
    """Reads the kernel's answers to one :class:`EncodedBatch` (feed it datagrams).

    ``done`` once the ack of ``BATCH_END`` arrived; ``error`` is the first refusal, as a
    :class:`NetlinkBatchError` naming the set and element where the kernel pointed at one.
    Answers to other sequence numbers (an earlier, abandoned batch) are ignored.
    """

    def __init__(self, batch: EncodedBatch) -> None:
        self.batch = batch
        self.done = False
        self.error: NetlinkBatchError | None = None
        self.acked = 0

    def _ours(self, seq: int) -> bool:
        b = self.batch
        if b.begin_seq <= b.end_seq:
            return b.begin_seq <= seq <= b.end_seq
        return seq >= b.begin_seq or seq <= b.end_seq  # wrapped around 2**32

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos + _HDR.size <= len(data):
            length, mtype, flags, _seq, _pid = _HDR.unpack_from(data, pos)
            if length < _HDR.size or pos + length > len(data):
                break
            if mtype == NLMSG_ERROR:
                self._ack(data[pos : pos + length], flags)
            pos += (length + 3) & ~3

    def _ack(self, msg: bytes, flags: int) -> None:
        if len(msg) < 36:
            return
        (err,) = struct.unpack_from("=i", msg, 16)
        olen, _otype, _oflags, oseq, _opid = _HDR.unpack_from(msg, 20)
        if not self._ours(oseq):
            return
        self.acked += 1
        if err != 0 and self.error is None:
            code = -err
            text, offset = None, None
            if flags & NLM_F_ACK_TLVS:
                tlv = 20 + (16 if flags & NLM_F_CAPPED else (olen + 3) & ~3)
                text, offset = _ext_ack(msg[tlv:])
            self.error = self._error(oseq, code, text, offset)
        if oseq == self.batch.end_seq:
            self.done = True

    def _error(
        self, seq: int, code: int, text: str | None, offset: int | None
    ) -> NetlinkBatchError:
        info = self.batch.messages.get(seq)
        element = info.element_at(offset) if info is not None and offset is not None else None
        where = ""
        if info is not None:
            where = f" ({info.op} element {info.set_name}"
            where += f" {{ {element} }})" if element is not None else ")"
        reason = os.strerror(code) + (f": {text}" if text else "")
        return NetlinkBatchError(
            f"nftables netlink batch refused{where}: {reason}",
            errno=code,
            set_name=info.set_name if info else None,
            element=element,
            op=info.op if info else None,
        )


def _ext_ack(data: bytes) -> tuple[str | None, int | None]:
    text: str | None = None
    offset: int | None = None
    pos = 0
    while pos + 4 <= len(data):
        n, kind = _NLA.unpack_from(data, pos)
        if n < 4:
            break
        payload = data[pos + 4 : pos + n]
        if kind == NLMSGERR_ATTR_MSG:
            text = payload.rstrip(b"\0").decode(errors="replace")
        elif kind == NLMSGERR_ATTR_OFFS and len(payload) >= 4:
            (offset,) = struct.unpack_from("=I", payload)
        pos += (n + 3) & ~3
    return text, offset


def iter_messages(data: bytes) -> Iterable[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body after the 16-byte header) of each message in ``data``."""
    pos = 0
    while pos + _HDR.size <= len(data):
        length, mtype, flags, seq, _pid = _HDR.unpack_from(data, pos)
        if length < _HDR.size:
            break
        yield mtype, flags, seq, data[pos + 16 : pos + length]
        pos += (length + 3) & ~3
