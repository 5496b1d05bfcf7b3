"""The migration benches' client, as a process of its own: ``GET /kv/probe`` every 1 ms.

    python -I -S prober.py SOURCE_ADDRESS [--port 8080] [--timeout-s 0.5]

Why a process: the benches run the controller and both agents in one Python process.
A prober thread there shares their GIL: each probe's result waited for one of their
threads to let go of it (up to the 5 ms switch interval each, more with several busy
threads), so the client saw the target's first answer late and probed sparsely during
the switch, while its own probes every millisecond took the GIL from the agents'
switch. A real client is a program of its own; so is this one. Its clock is
``time.monotonic`` (CLOCK_MONOTONIC, one clock for every process of the machine), so its
times compare with the runner's.

Probes the source's address; once a probe fails, alternates with the target's (given on
stdin as ``target ADDRESS`` when known), so the first answer there is seen without a
round trip to anyone. Each probe is one short-lived TCP connection with a raw ``GET``.

stdin: ``target ADDRESS`` (the target's address), ``stop`` (or EOF): finish.
stdout: ``first T ADDRESS`` at the first answer from each address (as it happens, so the
bench can wait for it), then at the stop one line ``log`` followed by one JSON list of
every probe: ``[start, end, address, status or 0, how it failed]``.
Standard library only, so it starts fast with ``-I -S``.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

_REQUEST = b"GET /kv/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def probe_why(address: str, port: int, timeout_s: float) -> tuple[int, str]:
    """Status code of ``GET /kv/probe`` on a fresh connection (0 when nothing answers),
    and how it failed ("" when it got an answer): the step (connect or answer) and the
    error, so a slow failure tells a SYN that got nothing back from a connection that
    was accepted and then not answered."""
    step = "connect"
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as s:
            step = "answer"
            s.sendall(_REQUEST)
            head = s.recv(64)
    except OSError as exc:
        return 0, f"{step}: {type(exc).__name__} {exc.errno or ''}".rstrip()
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return 0, f"answer: {head[:20]!r}"
    try:
        return int(parts[1]), ""
    except ValueError:
        return 0, f"answer: {head[:20]!r}"


class Loop:
    """The probing loop and what it saw (see the module docstring)."""

    def __init__(self, src: str, port: int, timeout_s: float) -> None:
        self.src, self.port, self.timeout_s = src, port, timeout_s
        self.target: str | None = None
        self.stop = threading.Event()
        self.log: list[tuple[float, float, str, int, str]] = []
        self.seen: set[str] = set()

    def run(self) -> None:
        addr, failed = self.src, False
        out = sys.stdout
        while not self.stop.is_set():
            t0 = time.monotonic()
            code, why = probe_why(addr, self.port, self.timeout_s)
            t = time.monotonic()
            self.log.append((t0, t, addr, code, why))
            if code in (200, 404):
                if addr not in self.seen:
                    self.seen.add(addr)
                    out.write(f"first {t!r} {addr}\n")
                    out.flush()
            else:
                failed = True
            if failed:  # the source went: alternate between both addresses
                other = self.target or self.src
                addr = other if addr == self.src else self.src
            time.sleep(0.001)


def main(argv: list[str]) -> int:
    src, port, timeout_s = argv[0], 8080, 0.5
    it = iter(argv[1:])
    for arg in it:
        if arg == "--port":
            port = int(next(it))
        elif arg == "--timeout-s":
            timeout_s = float(next(it))
        else:
            sys.exit(f"prober: unknown argument {arg!r}")
    loop = Loop(src, port, timeout_s)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "target" and arg:
            loop.target = arg
        elif cmd == "stop":
            break
    loop.stop.set()
    t.join(timeout_s + 5)
    sys.stdout.write("log\n" + json.dumps(loop.log) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
