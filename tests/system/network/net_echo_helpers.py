"""An echo server inside a network namespace, shared by the dataplane tests.

Each connection is answered with ``"<name> <peer address it sees>\\n"``, then every line
is echoed back prefixed with the name: a client learns which instance answered and which
address that instance saw, the two things translation must get right.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgevisor.network.netns import call_in

PORT = 7000


@dataclass
class EchoServer:
    name: str
    netns: str
    port: int = PORT
    family: socket.AddressFamily = socket.AF_INET
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _conns: list[socket.socket] = field(default_factory=list)

    def start(self) -> EchoServer:
        def listen() -> socket.socket:
            s = socket.socket(self.family)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", self.port))
            s.listen(64)
            s.settimeout(0.2)
            return s

        self._sock = call_in(self.netns, listen)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, peer[0]), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.sendall(f"{self.name} {peer}\n".encode())
            for line in conn.makefile("rb"):
                conn.sendall(f"{self.name} ".encode() + line)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        for c in self._conns:
            c.close()


def connect(netns: str, dst: object, timeout: float = 3.0, port: int = PORT) -> socket.socket:
    """A TCP connection to ``dst`` made from inside ``netns``."""
    return call_in(netns, lambda: socket.create_connection((str(dst), port), timeout=timeout))


def hello(netns: str, dst: object, timeout: float = 3.0) -> tuple[str, str, str] | None:
    """(own address, server name, address the server saw), or None if unreachable."""
    try:
        with connect(netns, dst, timeout) as s:
            line = s.makefile("rb").readline().decode().split()
            return (s.getsockname()[0], line[0], line[1]) if len(line) == 2 else None
    except OSError:
        return None


def eventually(check: Callable[[], bool], deadline_s: float = 20.0) -> bool:
    """Poll ``check`` every 0.1 s until it holds (True) or ``deadline_s`` passed (False)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False
