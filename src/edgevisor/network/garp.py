"""Gratuitous ARP / unsolicited neighbour advertisement: announce that a physical address
now lives on this host.

Peers keep a neighbour entry for a physical address that moved and would keep sending to
the old host's MAC. A gratuitous ARP *request* (sender IP == target IP, broadcast) makes
Linux peers update an existing entry even inside the neighbour ``locktime`` (the kernel
treats it as ``is_garp``). The frame is built by a pure function and sent from an
``AF_PACKET`` socket, which costs microseconds instead of an ``arping`` process start.

IPv6 has no ARP: the same announcement is an unsolicited neighbour advertisement
(RFC 4861 7.2.6) to all-nodes ``ff02::1`` with the Override flag and the target
link-layer address option; Linux peers then replace the link-layer address of an
existing entry (and mark it STALE, so it is confirmed before long). It goes out of a raw
ICMPv6 socket (the kernel fills in the checksum) with hop limit 255, as receivers
require.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

from edgevisor.network import netns as _netns

__all__ = ["GarpSender", "garp_frame", "na_message", "parse_mac"]

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def garp_frame(mac: bytes, address: IPv4Address) -> bytes:
    """Ethernet frame of a gratuitous ARP request for ``address`` from ``mac``."""
    if len(mac) != 6:
        raise ValueError("MAC must be 6 bytes")
    ip = address.packed
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    # htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, op 1 (request)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return eth + arp


ALL_NODES = "ff02::1"
_ND_NEIGHBOR_ADVERT = 136
_NA_OVERRIDE = 0x20000000
_OPT_TARGET_LLADDR = 2


def na_message(mac: bytes, address: IPv6Address) -> bytes:
    """ICMPv6 unsolicited neighbour advertisement for ``address`` at ``mac`` (checksum 0:
    the kernel computes it for raw ICMPv6 sockets)."""
    if len(mac) != 6:
        raise ValueError("MAC must be 6 bytes")
    head = struct.pack("!BBHI", _ND_NEIGHBOR_ADVERT, 0, 0, _NA_OVERRIDE)
    option = struct.pack("!BB", _OPT_TARGET_LLADDR, 1) + mac  # length in units of 8 bytes
    return head + address.packed + option


class GarpSender:
    """Sends gratuitous ARPs on one interface of one network namespace."""

    def __init__(self, ifname: str, netns: str | None = None) -> None:
        self.ifname = ifname

        def open_socket() -> tuple[socket.socket, bytes]:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            try:
                sock.bind((ifname, ETH_P_ARP))
                # Not /sys/class/net: sysfs shows the namespace it was mounted in.
                mac_text = _mac_via_ioctl(sock, ifname)
            except BaseException:
                sock.close()
                raise
            return sock, parse_mac(mac_text)

        self._sock, self.mac = _netns.call_in(netns, open_socket)
        self._netns = netns
        self._sock6: socket.socket | None = None
        self._index = 0

    def send(self, address: IPv4Address | IPv6Address, count: int = 1) -> None:
        if isinstance(address, IPv6Address):
            self._send_na(address, count)
            return
        frame = garp_frame(self.mac, address)
        for _ in range(count):
            self._sock.send(frame)

    def _send_na(self, address: IPv6Address, count: int) -> None:
        if self._sock6 is None:
            def open6() -> tuple[socket.socket, int]:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                    self.ifname.encode())
                    index = socket.if_nametoindex(self.ifname)
                except BaseException:
                    sock.close()
                    raise
                return sock, index

            self._sock6, self._index = _netns.call_in(self._netns, open6)
        index = self._index
        msg = na_message(self.mac, address)
        # Sent from the announced address itself (it is on the interface, without DAD).
        for _ in range(count):
            self._sock6.sendmsg([msg], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                                         address.packed + struct.pack("@I", index))],
                               0, (ALL_NODES, 0, 0, index))

    def close(self) -> None:
        self._sock.close()
        if self._sock6 is not None:
            self._sock6.close()


def _mac_via_ioctl(sock: socket.socket, ifname: str) -> str:
    import fcntl

    siocgifhwaddr = 0x8927
    req = struct.pack("256s", ifname.encode()[:15])
    res = fcntl.ioctl(sock.fileno(), siocgifhwaddr, req)
    return ":".join(f"{b:02x}" for b in res[18:24])
