"""Our NBD server against the real clients: qemu-io, qemu-img, nbdinfo, nbdcopy, libnbd."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgevisor.proto.nbd_wire import CMD_FLAG_FUA, REQUEST, REQUEST_MAGIC, Cmd
from edgevisor.storage.nbd_server import Export, NBDServer
from edgevisor.storage.volume import Volume

MiB = 1 << 20
SIZE = 8 * MiB
BS = 64 * 1024

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")),
    reason="NBD tools are required (Debian: qemu-utils, libnbd-bin)",
)


@dataclass
class Served:
    server: NBDServer
    port: int
    volume: Volume

    def uri(self, name: str = "vol") -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"


async def run(*argv: str, timeout: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    vol = Volume.create(tmp_path / "vol", SIZE, BS, present=False)
    server = NBDServer(workers=2)  # sessions on worker loops, devices on this loop
    server.add_export(Export("vol", vol, description="test volume"))
    _, port = await server.start("127.0.0.1", 0)
    try:
        yield Served(server, port, vol)
    finally:
        await server.aclose()
        vol.close()


async def test_qemu_io_patterns_at_random_offsets(served: Served) -> None:
    rnd = random.Random(os.getpid())
    cmds: list[str] = []
    spans = []
    for i in range(12):
        length = rnd.choice([512, 4096, 65536, 3 * 65536, 1000 * 512])
        off = rnd.randrange(0, (SIZE - length) // 512) * 512
        pat = 0x10 + i
        spans.append((off, length, pat))
        cmds += ["-c", f"write -P {pat:#x} {off} {length}"]
    # read back only what no later write overlapped
    for i, (off, length, pat) in enumerate(spans):
        if not any(o < off + length and off < o + n for o, n, _ in spans[i + 1 :]):
            cmds += ["-c", f"read -P {pat:#x} {off} {length}"]
    rc, out = await run("qemu-io", "-f", "raw", served.uri(), *cmds)
    assert rc == 0, out
    assert "Pattern verification failed" not in out
    # the oracle can fail: a wrong pattern is detected
    off, length, pat = spans[-1]
    rc, out = await run("qemu-io", "-f", "raw", served.uri(), "-c", f"read -P 0x01 {off} {length}")
    assert rc != 0 or "Pattern verification failed" in out
    # FUA and zero writes through qemu
    rc, out = await run(
        "qemu-io", "-f", "raw", served.uri(),
        "-c", "write -f -P 0x77 0 4096", "-c", "write -z 4096 4096",
        "-c", "read -P 0x77 0 4096", "-c", "read -P 0 4096 4096",
    )  # fmt: skip
    assert rc == 0, out


async def test_nbdcopy_round_trip_and_qemu_img_compare(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = bytearray(os.urandom(SIZE))
    data[2 * MiB : 3 * MiB] = bytes(MiB)  # a zero region to exercise sparse paths
    src.write_bytes(bytes(data))
    rc, out = await run("nbdcopy", str(src), served.uri())
    assert rc == 0, out
    back = tmp_path / "back.img"
    rc, out = await run("nbdcopy", served.uri(), str(back))
    assert rc == 0, out
    assert back.read_bytes() == src.read_bytes()
    rc, out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri())
    assert rc == 0, out
    assert await served.volume.checksum() == __import__("hashlib").sha256(data).hexdigest()
    # a single changed byte makes compare report a difference
    rc, out = await run("qemu-io", "-f", "raw", served.uri(), "-c", "write -P 0x5a 4096000 512")
    assert rc == 0, out
    rc, out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri())
    assert rc == 1, out


def parse_map(out: str) -> list[tuple[int, int, int]]:
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


async def test_nbdinfo_map_both_contexts(served: Served) -> None:
    rc, out = await run(
        "qemu-io", "-f", "raw", served.uri(),
        "-c", f"write -P 0xcd {BS} {2 * BS}", "-c", f"write -P 0xce {5 * BS} 100",
    )  # fmt: skip
    assert rc == 0, out
    rc, out = await run("nbdinfo", "--map=edgevisor:sync", served.uri())
    assert rc == 0, out
    sync = parse_map(out)
    # blocks 1-2 fully written -> present (0); the partial write leaves block 5 missing (1)
    assert sync[0] == (0, BS, 1)
    assert sync[1] == (BS, 2 * BS, 0)
    assert sync[2] == (3 * BS, SIZE - 3 * BS, 1)
    rc, out = await run("nbdinfo", "--map", served.uri())
    assert rc == 0, out
    alloc = parse_map(out)
    assert sum(n for _, n, _ in alloc) == SIZE
    data_rows = [(o, n) for o, n, st in alloc if st == 0]
    assert any(o <= BS and o + n >= 3 * BS for o, n in data_rows)
    assert any(o <= 5 * BS and o + n >= 5 * BS + 100 for o, n in data_rows)
    assert alloc[0][2] == 3  # hole,zero at the start
    rc, out = await run("nbdinfo", "--list", f"nbd://127.0.0.1:{served.port}")
    assert rc == 0 and 'export="vol"' in out, out


async def test_libnbd_python(served: Served, tmp_path: Path) -> None:
    python = "/usr/bin/python3"
    if not Path("/usr/lib/python3/dist-packages/nbd.py").exists():
        pytest.skip("python3-libnbd not installed")
    script = tmp_path / "t.py"
    script.write_text(
        f"""
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("edgevisor:sync")
h.connect_uri("{served.uri()}")
assert h.get_size() == {SIZE}
assert h.can_meta_context("edgevisor:sync")
h.pwrite(b"\\x42" * 131072, 65536, nbd.CMD_FLAG_FUA)
assert h.pread(131072, 65536) == b"\\x42" * 131072
# many requests in flight at once (aio)
bufs = [nbd.Buffer(4096) for _ in range(32)]
cookies = [h.aio_pread(bufs[i], 65536 + i * 4096) for i in range(32)]
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(b.to_bytearray() == bytearray(b"\\x42" * 4096) for b in bufs)
seen = {{}}
def cb(meta, offset, entries, err):
    seen[meta] = list(entries)
    return 0
h.block_status(4 * 65536, 0, cb)
assert seen["edgevisor:sync"][:4] == [65536, 1, 131072, 0], seen
h.flush()
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
try:
    h.pread(10, {SIZE} - 5)
except nbd.Error as e:
    print("past-end error ok", e.errno)
else:
    raise SystemExit("read past the end succeeded")
h.shutdown()
print("ok")
"""
    )
    rc, out = await run(python, str(script))
    assert rc == 0, out
    assert out.splitlines()[-2:] == ["past-end error ok EINVAL", "ok"], out


async def test_malformed_and_abrupt_clients_leave_no_state(served: Served) -> None:
    """Raw socket: handshake, a write past the end, a torn write, then disconnect."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3))
    name = b"vol"
    writer.write(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)  # EXPORT_NAME
    size, _flags = struct.unpack(">QH", await reader.readexactly(10))
    assert size == SIZE
    writer.write(REQUEST.pack(REQUEST_MAGIC, CMD_FLAG_FUA, Cmd.WRITE, 1, SIZE - 2, 4) + b"abcd")
    magic, err, handle = struct.unpack(">IIQ", await reader.readexactly(16))
    assert (magic, err, handle) == (0x67446698, 28, 1)  # ENOSPC, simple reply
    writer.write(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 2, 0, 4096) + b"x" * 100)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(200):
        if not served.server._conns:
            break
        await asyncio.sleep(0.05)
    assert not served.server._conns
    assert os.stat(served.volume.data_path).st_size == SIZE
    assert await served.volume.read(0, 100) == bytes(100)  # torn write never applied
    # garbage instead of a handshake: the server closes, keeps serving others
    s = socket.create_connection(("127.0.0.1", served.port))
    s.sendall(b"\xff" * 64)
    s.close()
    rc, out = await run("nbdinfo", "--size", served.uri())
    assert rc == 0 and out.strip() == str(SIZE), out
