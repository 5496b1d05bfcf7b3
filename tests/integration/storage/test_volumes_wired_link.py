"""The volumes capability between two hosts: TLS exports to one peer, lazy volumes, restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgevisor.agent.rpc import OpRouter
from edgevisor.agent.volume_fuse import LocalDevice
from edgevisor.agent.volumes import VolumesCapability
from edgevisor.errors import AlreadyExists, Conflict, NotFound, PeerUnavailable, RequestError
from edgevisor.pki import FleetCA, HostIdentity
from edgevisor.settings import load_settings
from edgevisor.storage.blockdev import OutOfRange
from edgevisor.storage.nbd_client import NBDClient

MiB = 1 << 20
Hosts = tuple[FleetCA, VolumesCapability, VolumesCapability]


@dataclass
class FakeAgent:
    """What the capability uses of :class:`~edgevisor.agent.daemon.Agent`."""

    host: str
    dir: Path
    router: OpRouter = field(default_factory=OpRouter)
    cfg: Any = field(default_factory=lambda: SimpleNamespace(controller_url="http://127.0.0.1:9"))


def _identity(ca: FleetCA, d: Path, host: str) -> HostIdentity:
    ident = HostIdentity(d / "pki", host)
    ident.store(ca.sign_host(host, ident.csr_pem()), ca.cert_pem)
    return ident


async def _start(tmp: Path, ca: FleetCA, host: str, **lazy: Any) -> VolumesCapability:
    settings = load_settings(
        overrides={"data_dir": str(tmp), **{f"storage.lazy.{k}": v for k, v in lazy.items()}},
        environ={},
    )
    agent = FakeAgent(host, tmp / "agent" / host)
    _identity(ca, agent.dir, host)
    cap = VolumesCapability(settings)
    await cap.start(agent)  # type: ignore[arg-type]
    return cap


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[Hosts]:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    a = await _start(tmp_path, ca, "a")
    b = await _start(tmp_path, ca, "b", fetch_timeout_s=5.0)
    try:
        yield ca, a, b
    finally:
        await b.stop()
        await a.stop()


async def _fill_pattern(cap: VolumesCapability, vid: str, size: int) -> bytes:
    data = b"".join(hashlib.sha256(str(i).encode()).digest() * 2048 for i in range(size // 65536))
    await cap.device(vid).write(0, data, fua=True)
    return data


async def test_lazy_volume_follows_its_source_over_tls(
    hosts: Hosts,
) -> None:
    _ca, a, b = hosts
    size = 8 * MiB
    info = await a.create("data", size, account="acme")
    assert (info["id"], info["role"], info["kind"]) == ("acme.data", "primary", "plain")
    data = await _fill_pattern(a, "acme.data", size)
    ep = await a.export("acme.data", peer="b")
    assert set(ep) == {"host", "address", "port", "export"} and ep["host"] == "a"

    b.cfg = b.cfg.model_copy(
        update={"lazy": b.cfg.lazy.model_copy(update={"fill_rate_bytes_per_s": 256 * 1024})}
    )
    linfo = await b.create_lazy("data", size, account="acme", source=ep, mirror="sync")
    assert linfo["kind"] == "lazy" and linfo["lazy"]["done"] is False
    dev = b.device("acme.data")
    # a read in the middle arrives at once, ahead of the throttled fill
    assert await dev.read(5 * MiB + 123, 4096) == data[5 * MiB + 123 : 5 * MiB + 123 + 4096]
    await dev.write(3 * MiB + 10, b"written on b", fua=True)  # mirrored synchronously
    assert await a.device("acme.data").read(3 * MiB + 10, 12) == b"written on b"
    with pytest.raises(Conflict):
        await b.promote("acme.data")  # still filling
    progress = b.info("acme.data")["lazy"]
    assert 0 < progress["bytes_present"] < size
    b.set_fill_rate("acme.data", 0)
    await b.wait_filled("acme.data", timeout_s=60)
    assert await b.checksum("acme.data") == await a.checksum("acme.data")
    await b.promote("acme.data")
    after = b.info("acme.data")
    assert (after["kind"], after["lazy"], after["present_bytes"]) == ("plain", None, size)
    assert await b.device("acme.data").read(3 * MiB + 10, 12) == b"written on b"


async def test_only_the_designated_peer_opens_an_export(hosts: Hosts, tmp_path: Path) -> None:
    ca, a, _b = hosts
    await a.create("secret", 1 * MiB, account="acme")
    ep = await a.export("acme.secret", peer="b")
    args = (ep["address"], ep["port"], ep["export"])
    b_id = HostIdentity(tmp_path / "agent" / "b" / "pki", "b")
    async with await NBDClient.connect(
        *args, ssl_context=b_id.client_context(), server_hostname="a"
    ) as c:
        assert c.size_bytes == 1 * MiB
    c_id = _identity(ca, tmp_path / "c", "c")  # a fleet host, but not the designated one
    with pytest.raises(PeerUnavailable):
        await NBDClient.connect(*args, ssl_context=c_id.client_context(), server_hostname="a")
    with pytest.raises(PeerUnavailable):  # no TLS at all
        await NBDClient.connect(*args)
    rogue = FleetCA.load_or_create(tmp_path / "rogue-ca")  # a certificate naming "b"
    r_id = _identity(rogue, tmp_path / "rogue", "b")  # from another CA
    with pytest.raises(PeerUnavailable):
        await NBDClient.connect(*args, ssl_context=r_id.client_context(), server_hostname="a")
    # re-designating moves the right to the new peer
    await a.export("acme.secret", peer="c")
    with pytest.raises(PeerUnavailable):
        await NBDClient.connect(*args, ssl_context=b_id.client_context(), server_hostname="a")
    async with await NBDClient.connect(
        *args, ssl_context=c_id.client_context(), server_hostname="a"
    ):
        pass
    await a.unexport("acme.secret")
    with pytest.raises(PeerUnavailable):
        await NBDClient.connect(*args, ssl_context=c_id.client_context(), server_hostname="a")


async def test_refusals(hosts: Hosts) -> None:
    _ca, a, b = hosts
    for bad in (0, -4096, 1000, 1 << 60):
        with pytest.raises(RequestError):
            await a.create("v", bad, account="acme")
    for acct, name in (("Acme", "v"), ("acme", "../x"), ("ac.me", "v"), ("acme", "")):
        with pytest.raises(RequestError):
            await a.create(name, MiB, account=acct)
    with pytest.raises(RequestError):
        await a.create("v", MiB, account="acme", block_size=3000)
    await a.create("v", MiB, account="acme")
    with pytest.raises(AlreadyExists):
        await a.create("v", MiB, account="acme")
    await a.create("v", MiB, account="other")  # same name, another account: its own volume
    with pytest.raises(NotFound):
        a.info("acme.nope")
    ep = await a.export("acme.v", peer="b")
    with pytest.raises(Conflict):  # the source has another size
        await b.create_lazy("v", 2 * MiB, account="acme", source=ep)
    with pytest.raises(RequestError):
        await b.create_lazy("v", MiB, account="acme", source={"host": "a"})
    assert b.list_volumes() == []  # nothing half-made stays behind
    await a.set_role("acme.v", "secondary")
    with pytest.raises(Conflict):
        await a.attach("acme.v", Path("/nonexistent"))
    await a.remove("acme.v")
    assert [v["id"] for v in a.list_volumes()] == ["other.v"]


async def test_ops_and_restart_resume_a_lazy_fill(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    key_mode = stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode)
    assert key_mode == 0o600
    a = await _start(tmp_path, ca, "a")
    b = await _start(tmp_path, ca, "b", fill_rate_bytes_per_s=2 * MiB)
    try:
        created = await a.agent.router.dispatch(
            "volumes.create", {"account": "acme", "name": "d", "size_bytes": 4 * MiB}
        )
        assert created["size_bytes"] == 4 * MiB
        await _fill_pattern(a, "acme.d", 4 * MiB)
        ep = await a.agent.router.dispatch(
            "volumes.export", {"account": "acme", "name": "d", "peer": "b"}
        )
        await b.agent.router.dispatch(
            "volumes.create_lazy",
            {"account": "acme", "name": "d", "size_bytes": 4 * MiB, "source": ep},
        )
        await b.device("acme.d").read(0, 4096)
        await b.stop()  # mid-fill
        b2 = await _start(tmp_path, ca, "b")  # same dirs: reopens and resumes
        try:
            info = b2.info("acme.d")
            assert info["kind"] == "lazy" and info["present_bytes"] >= 65536
            await b2.wait_filled("acme.d", timeout_s=60)
            assert await b2.checksum("acme.d") == await a.checksum("acme.d")
            listed = await b2.agent.router.dispatch("volumes.list", {"account": "acme"})
            assert [v["id"] for v in listed] == ["acme.d"]
            assert (await a.agent.router.dispatch(
                "volumes.info", {"account": "acme", "name": "d"}
            ))["exported_to"] == "b"  # fmt: skip
        finally:
            await b2.stop()
        out = await a.agent.router.dispatch("volumes.remove", {"account": "acme", "name": "d"})
        assert out == {"removed": True}
        assert not (a.vol_dir / "acme.d").exists()
    finally:
        await a.stop()
        await asyncio.sleep(0)


async def test_fuse_device_reads_directly_once_every_block_is_here(hosts: Hosts) -> None:
    _ca, a, b = hosts
    await a.create("full", 2 * MiB, account="acme")
    data = await _fill_pattern(a, "acme.full", 2 * MiB)
    assert a.local_socket is not None
    plain = await LocalDevice.open(
        str(a.local_socket), "acme.full", str(a.vol_dir / "acme.full" / "vol" / "data")
    )
    try:
        assert plain.direct  # a plain volume: every block is here from the start
        assert await plain.read(65536, 4096) == data[65536 : 65536 + 4096]
        await plain.write(65536, b"through the agent")  # writes always go to the owner
        assert await plain.read(65536, 17) == b"through the agent"  # one page cache
        assert await a.device("acme.full").read(65536, 17) == b"through the agent"
        with pytest.raises(OutOfRange):
            await plain.read(2 * MiB - 10, 20)
    finally:
        await plain.aclose()

    ep = await a.export("acme.full", peer="b")
    b.cfg = b.cfg.model_copy(
        update={"lazy": b.cfg.lazy.model_copy(update={"fill_rate_bytes_per_s": 256 * 1024})}
    )
    await b.create_lazy("copy", 2 * MiB, account="acme", source=ep, mirror="off")
    assert b.local_socket is not None
    lazy = await LocalDevice.open(
        str(b.local_socket), "acme.copy", str(b.vol_dir / "acme.copy" / "vol" / "data")
    )
    try:
        assert not lazy.direct  # blocks are missing: reads go to the agent, which fetches
        assert await lazy.read(MiB + 512, 4096) == (await a.device("acme.full").read(
            MiB + 512, 4096
        ))  # fmt: skip
        b.set_fill_rate("acme.copy", 0)
        await b.wait_filled("acme.copy", timeout_s=60)
        for _ in range(100):
            await lazy.read(0, 4096)
            if lazy.direct:
                break
            await asyncio.sleep(0.1)
        assert lazy.direct
        assert await lazy.read(65536, 17) == b"through the agent"
    finally:
        await lazy.aclose()
