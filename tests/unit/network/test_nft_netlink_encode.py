"""Unit tests of the nf_tables netlink encoder and ack reader (``network/nft_netlink.py``).

The element fixtures are the bytes nft 1.0.6 itself sends, captured on this machine (kernel
6.18, little-endian) in a scratch namespace holding the table of ``dp_core.render_table``:

    ip netns exec NS strace -e trace=sendmsg -xx -s 8000 nft -f FILE

with FILE holding one ``add element`` / ``delete element`` line per case below; the value
kept is the payload of each message's ``NFTA_SET_ELEM_LIST_ELEMENTS`` attribute (the
``NLA_F_NESTED|0x3`` string strace prints). ``nft --debug=netlink`` shows the same keys as
32-bit words. The ack fixtures are datagrams the kernel answered to batches of this
encoder (sequence numbers chosen by the capture script: 1000, 2000, 3000).
"""

from __future__ import annotations

import errno
import struct
import sys
from ipaddress import IPv4Address, IPv6Address

import pytest

from edgevisor.network.dp_core import Batch, render_batch
from edgevisor.network.nft_netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    AckReader,
    NetlinkBatchError,
    UnsupportedBatch,
    encode_batch,
    encode_empty,
    iter_messages,
    parse_declaration,
)

pytestmark = pytest.mark.skipif(
    sys.byteorder != "little", reason="fixtures captured on a little-endian host"
)

IFN = '"ev0123456789ab"'
# (operation, set, [(key, data)], captured NFTA_SET_ELEM_LIST_ELEMENTS payload)
CAPTURED: list[tuple[str, str, list[tuple[str, str | None]], str]] = [
    (
        "add",
        "iif_acct",
        [(IFN, "0x45560001")],  # ifname : mark
        "280001801800018014000100657630313233343536373839616200000c0002800800010001005645",
    ),
    (
        "add",
        "iif_zone",
        [(IFN, "1")],  # ifname : ct zone (2 bytes, host-endian)
        "280001801800018014000100657630313233343536373839616200000c0002800600010001000000",
    ),
    (
        "add",
        "phys_zone",
        [("10.250.1.5", "258")],  # ipv4 : ct zone
        "1c0001800c000180080001000afa01050c0002800600010002010000",
    ),
    (
        "add",
        "acct_if",
        [(f"0x45560001 . {IFN}", None)],  # mark . ifname
        "200001801c000180180001000100564565763031323334353637383961620000",
    ),
    (
        "add",
        "if_addr",
        [(f"{IFN} . 10.0.0.5", None)],  # ifname . ipv4
        "200001801c00018018000100657630313233343536373839616200000a000005",
    ),
    (
        "add",
        "local_logical6",
        [("0x45560002 . fd00::5", None)],  # mark . ipv6
        "200001801c0001801800010002005645fd000000000000000000000000000005",
    ),
    (
        "add",
        "out_snat",
        [("0x45560001 . 10.0.0.5", "10.250.1.5")],  # mark . ipv4 : ipv4
        "20000180100001800c000100010056450a0000050c000280080001000afa0105",
    ),
    (
        "add",
        "out_dnat6",
        [("0x45560002 . fd00::5", "fd99::1:5")],  # mark . ipv6 : ipv6
        "380001801c0001801800010002005645fd0000000000000000000000000000051800028014000100"
        "fd990000000000000000000000010005",
    ),
    (
        "add",
        "in_dnat",
        [("10.250.1.5", "10.0.0.5"), ("10.250.1.6", "10.0.0.6")],  # two
        "1c0001800c000180080001000afa01050c000280080001000a0000051c0002800c000180080001000afa"
        "01060c000280080001000a000006",
    ),
    (
        "add",
        "in_snat",
        [("0x45560003 . 10.250.3.9", "10.0.3.9")],
        "20000180100001800c000100030056450afa03090c000280080001000a000309",
    ),
    # The fence's hash sets: ct zone (host-endian, padded to 4) . address [. ct mark,
    # host-endian outside interval sets].
    (
        "add",
        "stale",
        [("258 . 10.0.0.5 . 0x10000000", None)],
        "18000180140001801000010002010000" "0a00000500000010",
    ),
    (
        "add",
        "stale6",
        [("2 . fd00::5 . 0x80000000", None)],
        "24000180200001801c00010002000000fd000000000000000000000000000005" "00000080",
    ),
    ("delete", "in_dnat", [("10.250.1.5", None)], "100001800c000180080001000afa0105"),
    (
        "delete",
        "in_snat",
        [("0x45560003 . 10.250.3.9", None)],
        "14000180100001800c000100030056450afa0309",
    ),
    (
        "delete",
        "phase_a",
        [("1 . 10.0.0.9", None)],
        "14000180100001800c000100010000000a000009",
    ),
]


def _attrs(body: bytes) -> dict[int, bytes]:
    """Top-level attributes of a message body after the 4-byte nfgenmsg."""
    out: dict[int, bytes] = {}
    pos = 4
    while pos + 4 <= len(body):
        n, kind = struct.unpack_from("=HH", body, pos)
        out[kind & 0x7FFF] = body[pos + 4 : pos + n]
        pos += (n + 3) & ~3
    return out


def _batch(op: str, name: str, items: list[tuple[str, str | None]]) -> Batch:
    b = Batch()
    if op == "add":
        b.adds[name] = items
    else:
        b.deletes[name] = [k for k, _ in items]
    return b


@pytest.mark.parametrize(
    ("op", "name", "items", "captured"), CAPTURED, ids=[f"{c[0]}-{c[1]}" for c in CAPTURED]
)
def test_elements_encode_as_nft_sends_them(
    op: str, name: str, items: list[tuple[str, str | None]], captured: str
) -> None:
    enc = encode_batch(_batch(op, name, items), "edgevisor", 100)
    msgs = list(iter_messages(enc.data))
    assert [m[0] for m in msgs] == [0x10, 0x0A0C if op == "add" else 0x0A0E, 0x11]
    _, flags, seq, body = msgs[1]
    assert seq == 101
    # As nft sends them (it asks for no acks); errors are reported without asking.
    assert flags == NLM_F_REQUEST | (NLM_F_CREATE if op == "add" else 0)
    assert body[0] == (10 if name.endswith("6") else 2)  # NFPROTO_IPV6 / NFPROTO_IPV4
    attrs = _attrs(body)
    assert attrs[1] == b"edgevisor\0" and attrs[2] == name.encode() + b"\0"
    assert attrs[3].hex() == captured


def test_batch_frame_sequence_and_lengths() -> None:
    b = Batch()
    b.deletes["out_dnat"] = ["0x45560001 . 10.0.0.7"]
    b.adds["out_dnat"] = [("0x45560001 . 10.0.0.7", "10.250.2.7")]
    enc = encode_batch(b, "t", 0xFFFFFFFE)  # sequence numbers wrap around
    msgs = list(iter_messages(enc.data))
    assert [(m[0], m[2]) for m in msgs] == [
        (0x10, 0xFFFFFFFE),
        (0x0A0E, 0xFFFFFFFF),
        (0x0A0C, 0),
        (0x11, 1),
    ]
    # BEGIN and END address the nf_tables subsystem (res_id 10, big-endian), family 0.
    assert msgs[0][3] == b"\x00\x00\x00\x0a" and msgs[3][3] == b"\x00\x00\x00\x0a"
    assert msgs[0][1] == NLM_F_REQUEST and msgs[3][1] == NLM_F_REQUEST | NLM_F_ACK
    assert (enc.begin_seq, enc.end_seq) == (0xFFFFFFFE, 1)
    total = 0
    for _ in msgs:
        (n,) = struct.unpack_from("=I", enc.data, total)
        total += n
    assert total == len(enc.data)
    assert encode_empty(7).data == bytes.fromhex(
        "140000001000010007000000000000000000000a140000001100050008000000000000000000000a"
    )


def test_ack_each_asks_for_an_ack_per_message() -> None:
    b = _batch("add", "in_dnat", [("10.250.1.7", "10.0.0.7")])
    b.deletes["out_dnat"] = ["0x45560001 . 10.0.0.7"]
    flags = [m[1] for m in iter_messages(encode_batch(b, "t", 1, ack_each=True).data)]
    assert flags == [
        NLM_F_REQUEST,
        NLM_F_REQUEST | NLM_F_ACK,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        NLM_F_REQUEST | NLM_F_ACK,
    ]


def test_order_follows_render_batch() -> None:
    """Map deletes, fence deletes, map adds, then fence adds: as render_batch writes."""
    k4, k6 = (1, IPv4Address("10.0.0.7")), (1, IPv6Address("fd00::7"))
    b = Batch()
    b.deletes = {"out_dnat": ["0x45560001 . 10.0.0.7"], "in_snat": ["0x45560001 . 10.250.2.7"]}
    b.adds = {"out_dnat": [("0x45560001 . 10.0.0.7", "10.250.3.7")]}
    b.stale_del = [(k4, 3)]
    b.stale_add = [(k6, 0), (k4, 2)]
    # k4: phase 1 -> 2 (leaves phase_a, enters phase_b); k6: 0 -> 1 (enters phase_a6).
    b.phase_moves = {k4: (1, 2), k6: (0, 1)}
    enc = encode_batch(b, "t", 1)
    got = [(m.op, m.set_name) for m in enc.messages.values()]
    assert got == [
        ("delete", "in_snat"),
        ("delete", "out_dnat"),
        ("delete", "phase_a"),
        ("delete", "stale"),
        ("add", "out_dnat"),
        ("add", "phase_a6"),
        ("add", "phase_b"),
        ("add", "stale"),
        ("add", "stale6"),
    ]
    text = render_batch(b, "t").splitlines()
    assert [(line.split()[0], line.split()[4]) for line in text] == got


def test_large_lists_are_split_below_the_16_bit_attribute_length() -> None:
    b = Batch()
    b.adds["out_dnat"] = [
        (f"0x45560001 . 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "10.250.0.1")
        for i in range(5000)
    ]
    enc = encode_batch(b, "t", 1)
    assert len(enc.messages) > 1
    keys = [text for m in enc.messages.values() for _, _, text in m.elements]
    assert keys == [k for k, _ in b.adds["out_dnat"]]
    for _, _, _, body in iter_messages(enc.data):
        assert len(body) < 0xFFFF


@pytest.mark.parametrize(
    "bad",
    [
        ("out_dnat", [("10.0.0.7", "10.250.2.7")]),  # a field missing
        ("iif_acct", [('"a-name-longer-than-15"', "0x1")]),  # not an interface name
        ("no_such_set", [("10.0.0.7", None)]),
        ("in_dnat", [("10.250.2.7", None)]),  # a map element without data
        ("acct_if", [('0x1 . "ev1"', "0x2")]),  # a set element with data
        ("in_dnat", [("10.250.2.700", "10.0.0.1")]),  # not an address
        ("iif_zone", [('"ev1"', "65536")]),  # a zone is 16 bits
        ("local_logical", [("0x1 . fd00::1", None)]),  # an IPv6 address in an IPv4 set
    ],
)
def test_unsupported_input_is_refused_before_sending(
    bad: tuple[str, list[tuple[str, str | None]]],
) -> None:
    with pytest.raises(UnsupportedBatch):
        encode_batch(_batch("add", *bad), "t", 1)


def test_declarations_parse_and_unknown_types_are_refused() -> None:
    s = parse_declaration(
        "s", "ip", "typeof ct zone . ct original ip saddr . ct mark; flags interval;"
    )
    assert [f.kind for f in s.key] == ["ct zone", "ipv4_addr", "mark"] and s.interval
    assert parse_declaration("m", "ip", "type mark . ipv4_addr : ipv4_addr;").data is not None
    with pytest.raises(UnsupportedBatch):
        parse_declaration("g", "ip", "type inet_proto . inet_service;")


# --- acks (kernel datagrams, see the module docstring) -------------------------------------

# Batch of seq 1000: delete in_dnat { 10.250.1.6, 10.250.9.9 }, the second missing:
# ENOENT, flags CAPPED|ACK_TLVS, NLMSGERR_ATTR_OFFS = 0x44 (the second element).
ACK_ENOENT = bytes.fromhex(
    "2c00000002000003e90300000f060000feffffff540000000e0a0500e9030000000000000800020044000000"
)
# Batch of seq 2000: add in_dnat { 10.250.1.6 : 10.0.0.99 } (the key holds another value).
ACK_EEXIST = bytes.fromhex(
    "2c00000002000003d10700000f060000efffffff500000000c0a0504d1070000000000000800020034000000"
)
# Batch of seq 3000: add in_dnat { 10.250.1.7 : 10.0.0.7 }: the element's ack, END's ack.
ACK_OK = [
    bytes.fromhex("2400000002000001b90b00000f06000000000000500000000c0a0504b90b000000000000"),
    bytes.fromhex("2400000002000001ba0b00000f060000000000001400000011000500ba0b000000000000"),
]


def test_success_acks_end_the_exchange() -> None:
    enc = encode_batch(_batch("add", "in_dnat", [("10.250.1.7", "10.0.0.7")]), "edgevisor", 3000)
    reader = AckReader(enc)
    reader.feed(ACK_OK[0])
    assert not reader.done and reader.error is None and reader.acked == 1
    reader.feed(ACK_OK[1])
    assert reader.done and reader.error is None


def test_enoent_names_the_missing_element() -> None:
    enc = encode_batch(
        _batch("delete", "in_dnat", [("10.250.1.6", None), ("10.250.9.9", None)]), "edgevisor", 1000
    )
    reader = AckReader(enc)
    reader.feed(ACK_ENOENT)
    err = reader.error
    assert isinstance(err, NetlinkBatchError)
    assert (err.errno, err.op, err.set_name, err.element) == (
        errno.ENOENT,
        "delete",
        "in_dnat",
        "10.250.9.9",
    )
    assert err.mapped and "10.250.9.9" in err.message
    assert not reader.done  # a refused batch gets no ack of its END


def test_eexist_names_the_clashing_element() -> None:
    enc = encode_batch(_batch("add", "in_dnat", [("10.250.1.6", "10.0.0.99")]), "edgevisor", 2000)
    reader = AckReader(enc)
    reader.feed(ACK_EEXIST)
    err = reader.error
    assert err is not None and err.errno == errno.EEXIST
    assert (err.op, err.set_name, err.element) == ("add", "in_dnat", "10.250.1.6")
    assert err.mapped


def test_error_without_offset_is_not_mapped() -> None:
    enc = encode_batch(_batch("add", "in_dnat", [("10.250.1.6", "10.0.0.99")]), "edgevisor", 2000)
    # The EEXIST ack without its extended-ack attribute (flags CAPPED only), errno EINVAL.
    plain = bytearray(ACK_EEXIST[:36])
    struct.pack_into("=I", plain, 0, 36)
    struct.pack_into("=H", plain, 6, 0x100)
    struct.pack_into("=i", plain, 16, -errno.EINVAL)
    reader = AckReader(enc)
    reader.feed(bytes(plain))
    assert reader.error is not None and reader.error.errno == errno.EINVAL
    assert reader.error.set_name == "in_dnat" and reader.error.element is None
    assert not reader.error.mapped


def test_acks_of_other_batches_are_ignored() -> None:
    enc = encode_batch(_batch("add", "in_dnat", [("10.250.1.7", "10.0.0.7")]), "edgevisor", 5)
    reader = AckReader(enc)
    for d in (ACK_ENOENT, *ACK_OK):
        reader.feed(d)
    assert reader.acked == 0 and reader.error is None and not reader.done
