"""The ``migration`` capability: the agent operations a migration's commands need.

The controller's runner (:mod:`edgevisor.migration.runner`) performs each command of the
migration machine as one or more of these ops on the source or the target host. Every op
is idempotent (a retry after a lost answer or a restart is harmless) and is built from the
``volumes`` and ``domains`` capabilities' Python APIs.

Ops (payload always has ``account`` and ``name``, the domain):

=========================  ======  ===================================================
``migration.offer``        source  export the domain's volume to ``peer``; return the
                                   domain spec, its app files (tar.gz, base64) and the
                                   NBD endpoint of the export
``migration.prepare``      target  define the domain here (not started), check that the
                                   source's export opens with this host's certificate
                                   (the authenticated link) and remember the source;
                                   post-copy: stage the domain and its lazy volume, held
``migration.preflush``     source  flush the running domain's volume (and its journal)
                                   right before the switch: the quiesce has less to write;
                                   return the volume's hot set (``hot``)
``migration.quiesce``      source  freeze, flush, stop the domain; flush the volume
``migration.set_role``     both    ``primary``/``secondary`` of this host's copy
``migration.start``        target  release the lazy volume (create it if absent),
                                   prefetch the source's hot set (``prefetch``) and
                                   start the domain
``migration.serving``      target  wait until the started domain listens on a TCP port
                                   (at most ``domains.fill_hold_s``): the runner holds
                                   the fill at its trickle until then
``migration.fill``         target  create the volume if absent (stop-and-copy) and set
                                   the fill rate; returns progress
``migration.progress``     target  bytes present / total, done
``migration.verify``       target  compare both copies block range by block range
``migration.resync``       target  flush (with the sync mirror, this reaches the source)
``migration.finish``       target  end mirroring: the filled lazy volume becomes plain
``migration.release``      source  delete the domain and its volume (after the commit)
``migration.resume``       source  make the copy primary again and start the domain
``migration.stop_target``  target  stop the domain
``migration.discard``      target  delete the domain and its volume
=========================  ======  ===================================================

Why the lazy volume is created *held* at ``prepare`` (post-copy) and released at
``migration.start``: before the switch the source domain is still writing, so a block
fetched then would be stale; a held volume fetches nothing, mirrors nothing (its fill and
read misses wait for the release), yet everything that does not depend on the data is
ready before the switch: its sparse file, the NBD links to the source, the FUSE process
and loop device of its attachment (``volumes.attach(mount=False)``), next to the domain's
staged cgroups and namespace. The switch then only releases the volume, mounts ext4 (on
the source's final data: the source quiesced), renames the veth and spawns the domain.
Until ``migration.fill`` (StartFill, right after the switch) the fill only trickles, so
the reads the target's mount and the starting domain miss are not queued behind fill
traffic.

Why the hot set: the mount and the service's start-up read a few blocks (ext4's
superblock, journal superblock, inodes, the service's data files) one after the other;
each missing one is a round trip to the source inside the downtime. The source names
them at ``preflush`` (:mod:`edgevisor.migration.domain_hot`), and the target asks for all
of them at once right after the release, so they arrive while the mount and the
interpreter start. A hint only: fetched after the release, every byte is final.

Why ``resync`` compares instead of replaying a dirty set: the ``volumes`` capability
mirrors synchronously (a write the source did not take fails instead of being
acknowledged) but writes the local copy first and keeps no record of what the source
missed, so after an outage the copies may differ by writes that failed; ``resync`` finds
them by comparing present blocks and pushes the target's version.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgevisor.errors import Conflict, NotFound, PeerUnavailable, RequestError
from edgevisor.migration.domain_host import syncfs
from edgevisor.migration.domain_hot import groups_from_payload, hot_ranges
from edgevisor.migration.domain_parts import DomainSpec
from edgevisor.storage.copy_compare import compare_copies, push_differences
from edgevisor.storage.nbd_client import NBDClient

if TYPE_CHECKING:
    from edgevisor.agent.daemon import Agent
    from edgevisor.agent.domains import DomainsCapability
    from edgevisor.agent.volumes import VolumesCapability

__all__ = ["MigrationCapability", "VerifyMismatch"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_UNLIMITED = 0  # the lazy volume's fill rate meaning "no limit"
_TRICKLE = 1 << 20
"""Fill rate during the switch, so the mount's on-demand reads have the link and the CPU;
the token-bucket wait (one batch) ends within ~1 s of StartFill. Full rate from the release
lost a same-run A/B (``switch_trace.py --compare-fill-rate``, 8 pairs): client downtime
p50 345 vs 451 ms, runner 107 vs 263 ms, fill after the start 318 vs 347 ms."""
_HOT_MAX_BYTES = 4 << 20
"""Cap of the hot set the source names (the target fetches it during the mount, ahead of
the fill: a few MiB take a few ms on a LAN)."""
_HOT_MAX_RANGES = 4096


class VerifyMismatch(Conflict):
    """The two copies differ (compared with no write to the range in flight)."""

    code = "verify_mismatch"


class MigrationCapability:
    """Answers ``migration.*`` on one host (see the module docstring)."""

    name = "migration"

    def __init__(self) -> None:
        self._agent: Agent | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dir = Path()
        self._fill_started: dict[str, float] = {}
        self._fill_took: dict[str, float] = {}
        self._timers: set[asyncio.Task[None]] = set()

    # -- capability ------------------------------------------------------------------

    async def start(self, agent: Agent) -> None:
        self._agent = agent
        self._loop = asyncio.get_running_loop()
        self._dir = agent.dir / "migration"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._hold_incoming(agent.dir / "domains")
        ops: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]] = {
            "migration.offer": self.op_offer,
            "migration.prepare": self.op_prepare,
            "migration.preflush": self.op_preflush,
            "migration.quiesce": self.op_quiesce,
            "migration.set_role": self.op_set_role,
            "migration.start": self.op_start,
            "migration.serving": self.op_serving,
            "migration.fill": self.op_fill,
            "migration.progress": self.op_progress,
            "migration.verify": self.op_verify,
            "migration.resync": self.op_resync,
            "migration.finish": self.op_finish,
            "migration.release": self.op_release,
            "migration.resume": self.op_resume,
            "migration.stop_target": self.op_stop_target,
            "migration.discard": self.op_discard,
        }
        for op, fn in ops.items():
            agent.router.add(op, self._on_loop(fn))

    def _hold_incoming(self, domains_dir: Path) -> None:
        """A target restarting in the middle of a migration must not start the domain
        by itself: the controller decides (it rolls back, or starts it again). Runs before
        the domains capability reads its ``state.json`` files."""
        for p in sorted(self._dir.glob("*.json")):
            state = domains_dir / p.stem / "state.json"
            try:
                saved = json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            if saved.get("desired") == "running":
                saved["desired"] = "stopped"
                tmp = state.with_suffix(".tmp")
                tmp.write_text(json.dumps(saved))
                tmp.replace(state)
                log.info("domain %s: migration here unfinished; not restarted", p.stem)

    async def stop(self) -> None:
        for t in list(self._timers):
            t.cancel()

    async def connected(self) -> None:
        return None

    def _on_loop(
        self, fn: Callable[[dict[str, Any]], Coroutine[Any, Any, T]]
    ) -> Callable[[dict[str, Any]], Awaitable[T]]:
        """Run ops on the agent's loop: volumes and domains own tasks bound to it, and an
        in-process controller calls in from its own loop."""

        async def run(payload: dict[str, Any]) -> T:
            loop = self._loop
            if loop is None or loop is asyncio.get_running_loop():
                return await fn(payload)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(payload), loop))

        return run

    @property
    def agent(self) -> Agent:
        assert self._agent is not None, "the migration capability has not started"
        return self._agent

    @property
    def volumes(self) -> VolumesCapability:
        v: VolumesCapability = self.agent.capability("volumes")
        return v

    @property
    def domains(self) -> DomainsCapability:
        d: DomainsCapability = self.agent.capability("domains")
        return d

    # -- state of an incoming migration (target side) --------------------------------

    def _state_path(self, account: str, name: str) -> Path:
        return self._dir / f"{account}.{name}.json"

    def _load(self, account: str, name: str) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = json.loads(self._state_path(account, name).read_text())
        except FileNotFoundError:
            raise NotFound(
                f"no migration of domain {name!r} is prepared on host {self.agent.host!r}"
            ) from None
        return raw

    def _save(self, account: str, name: str, state: dict[str, Any]) -> None:
        p = self._state_path(account, name)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, sort_keys=True))
        tmp.replace(p)

    @staticmethod
    def _who(p: dict[str, Any]) -> tuple[str, str]:
        try:
            return str(p["account"]), str(p["name"])
        except KeyError as exc:
            raise RequestError(f"payload lacks {exc.args[0]!r}") from None

    def _volume_id(self, account: str, name: str) -> str | None:
        d = self.domains.domains.get(f"{account}.{name}")
        return d.spec.volume_id if d is not None else None

    def _has_volume(self, vid: str) -> bool:
        try:
            self.volumes.info(vid)
        except NotFound:
            return False
        return True

    # -- source ops --------------------------------------------------------------------

    async def op_offer(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        d = self.domains.get(account, name)
        endpoint = await self.volumes.export(d.spec.volume_id, peer=str(p["peer"]))
        app = await asyncio.to_thread(_pack_dir, d.app_dir)
        return {
            "spec": d.spec.model_dump(mode="json"),
            "app_b64": base64.b64encode(app).decode(),
            "source": endpoint,
            "size_bytes": self.volumes.info(d.spec.volume_id)["size_bytes"],
        }

    async def op_preflush(self, p: dict[str, Any]) -> dict[str, Any]:
        """Flush ahead of the switch and name the volume's hot set (the ranges the target
        prefetches at its release: :mod:`edgevisor.migration.domain_hot`)."""
        account, name = self._who(p)
        d = self.domains.get(account, name)
        t0 = time.monotonic()
        await d.preflush()
        t1 = time.monotonic()
        hot: list[list[tuple[int, int]]] = []
        if d.phase == "running":
            try:
                hot = await asyncio.to_thread(
                    hot_ranges, d.mnt, d.processes(), max_bytes=_HOT_MAX_BYTES
                )
            except OSError as exc:  # only a hint
                log.info("domain %s: no hot set: %s", name, exc)
        return {
            "preflush_s": t1 - t0,
            "hot": [[list(r) for r in group] for group in hot],
            "hot_s": time.monotonic() - t1,
        }

    async def op_quiesce(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        d = self.domains.get(account, name)
        t0 = time.monotonic()
        await d.quiesce()
        with contextlib.suppress(NotFound):
            await self.volumes.device(d.spec.volume_id).flush()
        return {"phase": d.phase, "quiesce_s": time.monotonic() - t0}

    async def op_set_role(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        role = str(p["role"])
        vid = self._volume_id(account, name)
        if vid is None or not self._has_volume(vid):
            return {"role": role, "applied": False}  # the volume is created with its role
        if role == "secondary":
            d = self.domains.get(account, name)
            if d.phase not in ("stopped", "exited", "failed"):
                raise Conflict(f"domain {name!r} is {d.phase}; quiesce it before demoting")
            # quiesce detaches the volume in the background; not hurried: the demotion
            # runs right after the switch, and its cleanup keeps its configured delay
            # (``domains.quiesce_cleanup_delay_s``) instead of competing with the target
            await d.wait_torn_down(hurry=False)
        await self.volumes.set_role(vid, role)  # type: ignore[arg-type]
        return {"role": role, "applied": True}

    async def op_release(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        if f"{account}.{name}" not in self.domains.domains:
            return {"released": False}
        d = self.domains.get(account, name)
        with contextlib.suppress(NotFound):
            await self.volumes.unexport(d.spec.volume_id)
        await self.domains.remove(account, name)
        return {"released": True}

    async def op_resume(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        d = self.domains.get(account, name)
        vid = d.spec.volume_id
        if self._has_volume(vid):
            await self.volumes.set_role(vid, "primary")
            with contextlib.suppress(NotFound):
                await self.volumes.unexport(vid)
        await d.start()
        return self.domains.info(d)

    # -- target ops --------------------------------------------------------------------

    async def op_prepare(self, p: dict[str, Any]) -> dict[str, Any]:
        spec = DomainSpec.model_validate(p["spec"])
        source = dict(p["source"])
        await self._probe(source, int(p["size_bytes"]))
        if spec.qualified not in self.domains.domains:
            app = base64.b64decode(p["app_b64"]) if p.get("app_b64") else None
            # a logical address travels with the domain (the controller passes it)
            await self.domains.create(
                spec, app, start=False, address=p.get("address") or None,
                instance=p.get("instance") or None,
            )  # fmt: skip
        # network and cgroups now, so the switch only attaches the volume and spawns
        await self.domains.stage(spec.account, spec.name)
        state = {
            "source": source,
            "size_bytes": int(p["size_bytes"]),
            "rate_bytes_s": p.get("rate_bytes_s"),
            "volume_id": spec.volume_id,
            "volume": spec.volume,
        }
        self._save(spec.account, spec.name, state)
        if p.get("lazy"):
            # the volume held (nothing fetched before the source stops) with its FUSE
            # process and loop device up: the switch only releases it and mounts
            await self._ensure_volume(spec.account, spec.name, rate_bytes_s=_TRICKLE, held=True)
            d = self.domains.get(spec.account, spec.name)
            await self.volumes.attach(spec.volume_id, d.mnt, mount=False)
        return {"prepared": True}

    async def _probe(self, source: dict[str, Any], size_bytes: int) -> None:
        client = await self._connect(source)
        try:
            if client.size_bytes != size_bytes:
                raise Conflict(
                    f"source export is {client.size_bytes} bytes, expected {size_bytes}"
                )
        finally:
            await client.aclose()

    async def _connect(self, source: dict[str, Any]) -> NBDClient:
        ident = self.volumes.identity
        if ident is None or not ident.ready:
            raise PeerUnavailable("this host has no fleet certificate yet; cannot reach peers")
        return await NBDClient.connect(
            str(source["address"]), int(source["port"]), str(source["export"]),
            ssl_context=ident.client_context(), server_hostname=str(source["host"]),
        )  # fmt: skip

    async def _ensure_volume(
        self, account: str, name: str, *, rate_bytes_s: int | None = None, held: bool = False
    ) -> dict[str, Any]:
        """The lazy copy of the source's volume, created on first call (its fill at
        ``rate_bytes_s``; None: the migration's rate). ``held``: created held (see the
        module docstring); the fill's timer starts at the release (:meth:`_release`)."""
        st = self._load(account, name)
        vid = str(st["volume_id"])
        if not self._has_volume(vid):
            await self.volumes.create_lazy(
                str(st["volume"]), int(st["size_bytes"]), account=account,
                source=st["source"], mirror="sync", held=held,
            )  # fmt: skip
            # Before any await: the fill task has not taken its first tokens yet.
            if rate_bytes_s is None:
                rate_bytes_s = int(st.get("rate_bytes_s") or _UNLIMITED)
            self.volumes.set_fill_rate(vid, rate_bytes_s)
            if not held:
                self._time_fill_from_now(vid)
        return st

    def _time_fill_from_now(self, vid: str) -> None:
        if vid in self._fill_started or vid in self._fill_took:  # timed (or timing) already
            return
        self._fill_started[vid] = t0 = time.monotonic()
        self._background(self._time_fill(vid, t0))

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    async def _release(self, vid: str) -> None:
        """End the hold of a volume created in prepare (the source's data is final now)."""
        await self.volumes.release_lazy(vid)
        self._time_fill_from_now(vid)

    async def _time_fill(self, vid: str, t0: float) -> None:
        try:
            await self.volumes.wait_filled(vid, None)
            self._fill_took[vid] = time.monotonic() - t0
        except Exception:  # e.g. the volume went away: progress falls back to bytes
            log.debug("fill timer of %s ended without a figure", vid, exc_info=True)
        finally:
            self._fill_started.pop(vid, None)

    async def op_start(self, p: dict[str, Any]) -> dict[str, Any]:
        """Release the volume, prefetch the source's hot set (``prefetch``: ranges from
        the source's ``preflush``) while the domain starts, start it."""
        account, name = self._who(p)
        t0 = time.monotonic()
        st = await self._ensure_volume(account, name, rate_bytes_s=_TRICKLE)
        vid = str(st["volume_id"])
        await self._release(vid)
        groups = groups_from_payload(p.get("prefetch"), _HOT_MAX_RANGES)
        if groups:
            # the source's data is final now (released): every fetched byte is current
            self._background(self._prefetch(vid, groups))
        d = self.domains.get(account, name)
        await d.start()
        out = self.domains.info(d)
        out["start_s"] = time.monotonic() - t0
        return out

    async def _prefetch(self, vid: str, groups: list[list[tuple[int, int]]]) -> None:
        """Each group's ranges at once, group after group (the first is what the mount
        reads: the rest would only queue ahead of it on the link)."""
        try:
            for ranges in groups:
                await self.volumes.prefetch(vid, ranges)
        except Exception:  # a hint: e.g. the volume went away (discarded)
            log.debug("prefetch of %s ended early", vid, exc_info=True)

    async def op_serving(self, p: dict[str, Any]) -> dict[str, Any]:
        """Wait until the domain started here listens (its service is up), at most
        ``domains.fill_hold_s``: until then its start-up's on-demand reads and CPU do not
        compete with a full-rate fill. Answers at once for a domain not running here."""
        account, name = self._who(p)
        d = self.domains.domains.get(f"{account}.{name}")
        t0 = time.monotonic()
        hold_s = self.domains.cfg.fill_hold_s
        listening = d is not None and hold_s > 0 and await d.wait_listening(hold_s)
        return {"listening": listening, "waited_s": time.monotonic() - t0}

    async def op_fill(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        st = await self._ensure_volume(account, name)
        self.volumes.set_fill_rate(str(st["volume_id"]), int(p.get("rate_bytes_s") or _UNLIMITED))
        return self._progress(str(st["volume_id"]))

    async def op_progress(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        return self._progress(str(self._load(account, name)["volume_id"]))

    def _progress(self, vid: str) -> dict[str, Any]:
        info = self.volumes.info(vid)
        lazy = info.get("lazy")
        total = int(info["size_bytes"])
        present = int(lazy["bytes_present"]) if lazy else int(info["present_bytes"])
        # Every byte present is not yet the fill's end (its final flush makes them
        # durable); while a fill timed here runs, "done" waits for it, so a done answer
        # always carries ``fill_s`` (the runner reads it only once).
        done = present >= total and vid not in self._fill_started
        return {
            "present_bytes": present,
            "total_bytes": total,
            "rate_bytes_s": lazy["rate_bytes_per_s"] if lazy else None,
            "done": done,
            # from creating the lazy volume (at the switch) to every block present
            "fill_s": self._fill_took.get(vid),
        }

    async def op_verify(self, p: dict[str, Any]) -> dict[str, Any]:
        """Compare both copies range by range, each under the lazy volume's write barrier
        (no write to the range in flight on either copy while both are read): exact, so
        a difference is real and fails the verification at once."""
        account, name = self._who(p)
        st = self._load(account, name)
        vid = str(st["volume_id"])
        await self.volumes.wait_filled(vid, None)
        dev = self.volumes.device(vid)
        await dev.flush()
        client = await self._connect(st["source"])
        try:
            res = await compare_copies(dev, client)
        except TimeoutError as e:  # mirrored writes in flight did not reach the source
            raise PeerUnavailable(f"verify of {vid}: writes to the source stalled") from e
        finally:
            await client.aclose()
        if res.mismatch is not None:
            off, n = res.mismatch
            raise VerifyMismatch(
                f"copies of {vid} differ at bytes {off}..{off + n}",
                details={"offset": off, "length": n},
            )
        return {"sha256": res.sha256, "rereads": 0}

    async def op_resync(self, p: dict[str, Any]) -> dict[str, Any]:
        """Make the source hold every block written here: compare each range of present
        blocks with the source and push the ones that differ. (A missing block was never
        written here, so the source's is the right one.) Needed because a write the
        mirror could not deliver fails *after* it reached the local copy: not
        acknowledged, but present here. Each range is compared and pushed under the lazy
        volume's write barrier, so a push never overwrites a newer mirrored write."""
        account, name = self._who(p)
        try:
            st = self._load(account, name)
        except NotFound:
            return {"pushed_bytes": 0}
        vid = str(st["volume_id"])
        if not self._has_volume(vid):
            return {"pushed_bytes": 0}
        dev = self.volumes.device(vid)
        await dev.flush()
        client = await self._connect(st["source"])
        try:
            pushed = await push_differences(dev, client)
            await client.flush()
        except TimeoutError as e:
            raise PeerUnavailable(f"resync of {vid}: writes to the source stalled") from e
        finally:
            await client.aclose()
        return {"pushed_bytes": pushed}

    async def op_finish(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        try:
            vid = str(self._load(account, name)["volume_id"])
        except NotFound:
            return {"finished": False}  # done before
        # Promote closes the lazy volume's link to the source: an I/O in flight on it then
        # fails (EIO, and ext4 aborts its journal). So hold the domain still and flush
        # its filesystem first; the pause is the flush.
        d = self.domains.domains.get(f"{account}.{name}")
        frozen = False
        if d is not None and d.phase == "running":
            await d.freeze()
            frozen = True
        try:
            if d is not None and frozen:
                try:
                    await asyncio.to_thread(syncfs, d.mnt)
                except OSError as exc:  # the filesystem's own trouble: promote regardless
                    log.warning("domain %s: flush before promote failed: %s", name, exc)
            await self.volumes.promote(vid)
        finally:
            if frozen and d is not None:
                await d.thaw()
        self._state_path(account, name).unlink(missing_ok=True)
        return {"finished": True}

    async def op_stop_target(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        if f"{account}.{name}" not in self.domains.domains:
            return {"stopped": False}
        d = self.domains.get(account, name)
        await d.stop()
        return {"stopped": True}

    async def op_discard(self, p: dict[str, Any]) -> dict[str, Any]:
        account, name = self._who(p)
        vid: str | None = None
        with contextlib.suppress(NotFound):
            vid = str(self._load(account, name)["volume_id"])
        if f"{account}.{name}" in self.domains.domains:
            vid = vid or self._volume_id(account, name)
            await self.domains.remove(account, name)
        if vid is not None and self._has_volume(vid):
            await self.volumes.remove(vid)
        self._state_path(account, name).unlink(missing_ok=True)
        return {"discarded": True}


def _pack_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                tf.add(child, arcname=child.name)
    return buf.getvalue()
