"""Pipelined fill lanes (lazy_lane.BlockingLane over nbd_blocking.BlockingReader) against
our NBD server, plain and over TLS (session threads).

The export's device holds reads at will (a device without a file fast path: the server
answers it from its device loop, in completion order), so a test sees how many reads
reach the source at once, releases them in any order, and cuts the link (a proxy on
loopback) or closes the lane while reads are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgevisor.errors import PeerUnavailable
from edgevisor.pki import FleetCA, HostIdentity
from edgevisor.storage.lazy_lane import BlockingLane, FillLanes
from edgevisor.storage.nbd_blocking import BlockingReader
from edgevisor.storage.nbd_client import Endpoint, NBDCommandError
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
BS = 64 * 1024
SIZE = 4 * MiB
READ = 2 * BS  # one read of a test: two blocks, at READ * i


class GatedDevice:
    """A volume whose reads wait while ``hold`` is set, until the test releases them.
    No ``file_extent``: the server performs every read on its device loop."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.hold = False
        self.waiting: dict[int, asyncio.Event] = {}  # offset -> its release
        self.entered: Counter[int] = Counter()

    @property
    def size_bytes(self) -> int:
        return self.vol.size_bytes

    @property
    def block_size(self) -> int:
        return self.vol.block_size

    async def read(self, offset: int, length: int) -> bytes:
        self.entered[offset] += 1
        if self.hold:
            ev = self.waiting[offset] = asyncio.Event()
            await ev.wait()
        return await self.vol.read(offset, length)

    def release(self, offset: int | None = None) -> None:
        for off in [offset] if offset is not None else list(self.waiting):
            self.waiting.pop(off).set()

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self.vol.write(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.vol.write_zeroes(offset, length, fua=fua)

    async def trim(self, offset: int, length: int) -> None:
        await self.vol.trim(offset, length)

    async def flush(self) -> None:
        await self.vol.flush()

    def present(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.vol.present(offset, length)

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.vol.allocated(offset, length)


@dataclass
class Proxy:
    """A loopback TCP forwarder whose :meth:`cut` drops every connection through it."""

    target_port: int
    port: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [w, uw]
        for src, dst in ((r, uw), (ur, w)):
            t = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def aclose(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class Link:
    endpoint: Endpoint
    device: GatedDevice
    content: bytes
    server: NBDServer
    proxy: Proxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = FleetCA.load_or_create(d / "ca")
    for host in ("source", "target"):
        ident = HostIdentity(d / host, host)
        ident.store(ca.sign_host(host, ident.csr_pem()), ca.cert_pem)
    return d


@pytest.fixture(params=["plain", "tls"])
async def link(request: pytest.FixtureRequest, pki: Path, tmp_path: Path) -> AsyncIterator[Link]:
    vol = Volume.create(tmp_path / f"src-{os.getpid()}", SIZE, BS)
    content = os.urandom(SIZE)
    await vol.write(0, content)
    dev = GatedDevice(vol)
    tls = request.param == "tls"
    if tls:
        srv = NBDServer(
            ssl_context=HostIdentity(pki / "source", "source").server_context(),
            tls_required=True,
            workers=1,
        )
        srv.add_export(Export("src", dev, allowed_peers=frozenset({"target"})))
    else:
        srv = NBDServer(workers=1)
        srv.add_export(Export("src", dev))
    _, port = await srv.start("127.0.0.1", 0)
    proxy = Proxy(port)
    await proxy.start()
    ctx = HostIdentity(pki / "target", "target").client_context() if tls else None
    ep = Endpoint("127.0.0.1", proxy.port, "src", ctx, "source" if tls else None, None, 30.0)
    try:
        yield Link(ep, dev, content, srv, proxy)
    finally:
        dev.hold = False
        dev.release()
        await proxy.aclose()
        await srv.aclose()
        vol.close()


async def _settle(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not reached in time: {what}"
        await asyncio.sleep(0.01)


def _lane_name() -> str:
    return f"pipe-{os.getpid()}-{time.monotonic_ns()}"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_reads_in_flight_together_and_replies_matched_out_of_order(link: Link) -> None:
    lane = BlockingLane(_lane_name(), link.endpoint, depth=4)
    try:
        link.device.hold = True
        bufs = [bytearray(READ) for _ in range(4)]
        tasks = [
            asyncio.create_task(lane.read(i * READ, memoryview(b))) for i, b in enumerate(bufs)
        ]
        # All four at the source at once: each was sent before any reply came back.
        await _settle(lambda: len(link.device.waiting) == 4, "four reads at the source")
        assert lane.in_flight == 4
        # Answered last to first; each lands in its own buffer, the others wait on.
        released: set[int] = set()
        for i in (3, 1, 2, 0):
            link.device.release(i * READ)
            released.add(i)
            await asyncio.wait_for(tasks[i], 30)
            assert bufs[i] == link.content[i * READ : (i + 1) * READ]
            assert {j for j, t in enumerate(tasks) if t.done()} == released
        assert lane.in_flight == 0
        # More reads than the window: at most ``depth`` reach the source at once.
        link.device.hold = True
        bufs = [bytearray(READ) for _ in range(7)]
        tasks = [
            asyncio.create_task(lane.read(i * READ, memoryview(b))) for i, b in enumerate(bufs)
        ]
        await _settle(lambda: len(link.device.waiting) == 4, "a full window")
        await asyncio.sleep(0.2)  # room for a (wrong) fifth send
        assert len(link.device.waiting) == 4 and lane.in_flight == 4
        link.device.hold = False
        link.device.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for i, b in enumerate(bufs):
            assert b == link.content[i * READ : (i + 1) * READ]
    finally:
        await lane.close()


async def test_an_error_reply_fails_only_its_read(link: Link) -> None:
    def run() -> None:
        r = BlockingReader(link.endpoint)
        try:
            a, bad, c = bytearray(BS), bytearray(20), bytearray(3 * BS)
            ta = r.submit(0, a)
            tb = r.submit(SIZE - 10, bad)  # past the end: the server's error reply
            tc = r.submit(BS + 5, c)
            assert r.in_flight == 3
            got = dict(r.receive() for _ in range(3))
            assert got[ta] is None and got[tc] is None
            assert isinstance(got[tb], NBDCommandError)
            assert a == link.content[:BS] and c == link.content[BS + 5 : 4 * BS + 5]
            d = bytearray(100)
            r.read_into(7, d)  # the connection went on
            assert d == link.content[7:107]
            with pytest.raises(RuntimeError):
                r.receive()  # nothing in flight: a caller's bug, not a hang
        finally:
            r.close()

    await asyncio.to_thread(run)


async def test_a_cut_fails_exactly_the_reads_in_flight(link: Link) -> None:
    lane = BlockingLane(_lane_name(), link.endpoint, depth=4)
    try:
        link.device.hold = True
        bufs = [bytearray(READ) for _ in range(6)]
        tasks = [
            asyncio.create_task(lane.read(i * READ, memoryview(b))) for i, b in enumerate(bufs)
        ]
        await _settle(lambda: len(link.device.waiting) == 4, "four reads at the source")
        link.proxy.cut()
        link.device.hold = False  # the two reads not sent yet go out on a new connection
        res = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert [isinstance(r, PeerUnavailable) for r in res] == [True] * 4 + [False] * 2
        assert res[4:] == [None, None]
        for i in (4, 5):
            assert bufs[i] == link.content[i * READ : (i + 1) * READ]
        assert lane.in_flight == 0
        link.device.release()
    finally:
        await lane.close()


async def test_fill_lanes_retry_exactly_the_reads_a_cut_lost(link: Link) -> None:
    stored: Counter[int] = Counter()
    wrong: list[int] = []
    lock = threading.Lock()

    def store(first: int, view: memoryview) -> None:  # on a store thread
        with lock:
            stored[first] += 1
            if bytes(view) != link.content[first * BS : first * BS + len(view)]:
                wrong.append(first)

    async def no_connect() -> object:
        raise AssertionError("blocking lanes only")

    lanes = FillLanes(
        1,
        link.endpoint,
        no_connect,  # type: ignore[arg-type]
        store,
        block_size=BS,
        buffer_bytes=READ,
        reconnect_interval_s=0.05,
    )
    try:
        link.device.hold = True
        deadline = time.monotonic() + 60
        firsts = [i * (READ // BS) for i in range(6)]
        fetches = [
            asyncio.create_task(lanes.fetch(f, READ, deadline, lambda: False)) for f in firsts
        ]
        await _settle(lambda: len(link.device.waiting) == 4, "four reads at the source")
        link.proxy.cut()
        link.device.hold = False
        link.device.release()
        await asyncio.wait_for(asyncio.gather(*fetches), 60)
        assert stored == Counter(firsts) and not wrong  # each stored once, right bytes
        # The source saw the four reads lost in flight twice, the two others once.
        assert [link.device.entered[f * BS] for f in firsts] == [2, 2, 2, 2, 1, 1]
    finally:
        await lanes.close()


async def test_close_with_reads_in_flight_leaks_no_thread_or_fd(link: Link) -> None:
    fds0 = _fds()
    name = _lane_name()
    lane = BlockingLane(name, link.endpoint, depth=4)
    link.device.hold = True
    bufs = [bytearray(READ) for _ in range(6)]
    tasks = [asyncio.create_task(lane.read(i * READ, memoryview(b))) for i, b in enumerate(bufs)]
    await _settle(lambda: len(link.device.waiting) == 4, "four reads at the source")
    # A caller that gives up on a read in flight waits for that read to end.
    tasks[0].cancel()
    await asyncio.sleep(0.2)
    assert not tasks[0].done()
    await asyncio.wait_for(lane.close(), 30)
    res = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert isinstance(res[0], asyncio.CancelledError)
    assert all(isinstance(r, PeerUnavailable) for r in res[1:])
    assert not any(t.name == name for t in threading.enumerate())
    with pytest.raises(PeerUnavailable):
        await lane.read(0, memoryview(bytearray(BS)))
    await lane.close()  # idempotent
    link.device.release()  # the source's session ends once its reads are answered
    await _settle(lambda: link.server.connections == 0, "the source's sessions end")
    await _settle(lambda: _fds() <= fds0, f"descriptors back to {fds0} (now {_fds()})")
