"""Gratuitous ARP: announce that a physical address now lives on this host.

Peers keep a neighbour entry for a physical address that moved and would keep sending to
the old host's MAC. A gratuitous ARP *request* (sender IP == target IP, broadcast) makes
Linux peers update an existing entry even inside the neighbour ``locktime`` (the kernel
treats it as ``is_garp``). The frame is built by a pure function and sent from an
``AF_PACKET`` socket, which costs microseconds instead of an ``arping`` process start.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

from edgevisor.network import netns as _netns

__all__ = ["GarpSender", "garp_frame", "parse_mac"]

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

    def send(self, address: IPv4Address, count: int = 1) -> None:
        frame = garp_frame(self.mac, address)
        for _ in range(count):
            self._sock.send(frame)

    def close(self) -> None:
        self._sock.close()


def _mac_via_ioctl(sock: socket.socket, ifname: str) -> str:
    import fcntl

    siocgifhwaddr = 0x8927
    req = struct.pack("256s", ifname.encode()[:15])
    res = fcntl.ioctl(sock.fileno(), siocgifhwaddr, req)
    return ":".join(f"{b:02x}" for b in res[18:24])
