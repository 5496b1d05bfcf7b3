"""The agent half of deployments (the controller half is
:mod:`edgevisor.control.deployments`).

Theory of operation: the agent polls ``GET /v1/hosts/<host>/deployments`` (every
``POLL_INTERVAL_S``, on ``deployment.poke`` from the controller and on reconnect). For each
account whose wanted version is newer than the last good one it runs :meth:`Deployer.apply`
as one asyncio task, with these steps, each reported (``running`` -> ``done``/``failed``):

1. ``fetch task X`` — bundle bytes from the controller (a missing bundle fails here);
2. ``stage task X`` — the bundle is deployed under a staging name (``<acct>.<task>.staged``)
   so its environment must start; then the staged copy is removed. Nothing the account
   runs has changed yet;
3. ``switch tasks`` — each task is deployed under its real name (the previous version of
   every task is remembered first);
4. ``devices``, ``routes``, ``timers`` — the account's devices are added, and the routes
   and timers of the previous deployment are replaced by the new ones (so routes and
   timers the new version drops are gone);
5. ``remove old devices`` — devices of the previous deployment that the new one drops:
   credentials removed (a certificate revoked), shadow removed, connections closed. The
   undo puts each back as it was (same password hash, same certificate, same shadow);
6. ``remove old tasks`` — tasks of the previous deployment that the new one drops.

If a step fails, everything done so far is undone in reverse (tasks back to the versions
remembered, routes and timers to the snapshot), the deployment is reported ``failed`` with
the failing step named, and the last good version keeps running. ``deployment.cancel``
(or a ``cancelled`` state seen by the poll) cancels the asyncio task at whatever step it
waits on — also a task that never starts — and the same undo runs; the report is
``cancelled``. A new version therefore runs only once all of it is in place; a failure in
the short switch window (3-4) is undone before the report goes out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevisor.agent.tasks import qualified, split, task_json
from edgevisor.devices.routes import Route
from edgevisor.devices.timers import Timer
from edgevisor.errors import EdgevisorError, NotFound
from edgevisor.tasks.calls import TaskVersion
from edgevisor.tasks.service import Coordinator

if TYPE_CHECKING:
    from edgevisor.agent.daemon import Agent
    from edgevisor.agent.devices import DevicesCapability

__all__ = ["POLL_INTERVAL_S", "STAGED_SUFFIX", "Deployer"]

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 5.0
STAGED_SUFFIX = ".staged"


class Deployer:
    """Pulls each account's wanted deployment, applies it step by step, undoes on failure."""

    def __init__(self, agent: Agent, devices: DevicesCapability) -> None:
        self.agent = agent
        self.devices = devices
        self.path: Path = agent.dir / "deployments.json"
        self.state: dict[str, dict[str, Any]] = self._load()
        self._running: dict[str, tuple[int, asyncio.Task[None]]] = {}
        self._cancelled: set[tuple[str, int]] = set()
        self._kick = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
            return data
        except (FileNotFoundError, ValueError):
            return {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def _acct(self, account: str) -> dict[str, Any]:
        return self.state.setdefault(account, {"good": None, "last": None})

    # -- loop --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.create_task(self._poll_loop(), name="devices-deployments")

    async def stop(self) -> None:
        tasks = [t for _, t in self._running.values()]
        if self._loop is not None:
            tasks.append(self._loop)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def poke(self) -> None:
        self._kick.set()

    async def _poll_loop(self) -> None:
        while True:
            self._kick.clear()
            try:
                await self.poll()
            except EdgevisorError as exc:
                log.debug("deployment poll: %s", exc)
            except Exception:
                log.exception("deployment poll failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._kick.wait()

    async def poll(self) -> None:
        """One round: report unsent results, then start or cancel what the controller wants."""
        await self._report_pending()
        wanted = await self.agent.request("GET", f"/v1/hosts/{self.agent.host}/deployments")
        async with self._lock:
            for d in wanted or []:
                self._consider(str(d["account"]), int(d["version"]), str(d["state"]), d)

    def _consider(self, account: str, version: int, state: str, d: dict[str, Any]) -> None:
        running = self._running.get(account)
        if state == "cancelled":
            if running is not None and running[0] == version:
                self._cancel(account, version)
            return
        if running is not None:
            if running[0] != version:  # a newer version supersedes the one in flight
                self._cancel(account, running[0])
            return
        if state not in ("pending", "applying", "succeeded"):
            return  # failed here before (the state file may be gone): needs a new version
        acct = self._acct(account)
        good = acct["good"]
        last = acct["last"]
        if good is not None and good["version"] >= version:
            return
        if last is not None and last["version"] == version and last["state"] != "applying":
            return  # already failed or cancelled; a new version is needed
        spec = dict(d["spec"])
        task = asyncio.create_task(self._run(account, version, spec), name=f"deploy-{account}")
        self._running[account] = (version, task)

    def _cancel(self, account: str, version: int) -> bool:
        running = self._running.get(account)
        if running is None or running[0] != version:
            return False
        self._cancelled.add((account, version))
        running[1].cancel()
        return True

    async def forget(self, account: str) -> None:
        """The account is gone: stop its deployment in flight (its undo runs) and drop its
        state, so nothing of it is re-applied or reported."""
        running = self._running.get(account)
        if running is not None:
            self._cancel(account, running[0])
            await asyncio.gather(running[1], return_exceptions=True)
        async with self._lock:
            if self.state.pop(account, None) is not None:
                self._save()

    # -- ops ---------------------------------------------------------------------------

    async def op_poke(self, _p: dict[str, Any]) -> dict[str, Any]:
        self.poke()
        return {"ok": True}

    async def op_status(self, p: dict[str, Any]) -> dict[str, Any]:
        account = str(p["account"])
        acct = self.state.get(account) or {"good": None, "last": None}
        good = acct["good"]
        return {
            "account": account,
            "good_version": good["version"] if good else None,
            "last": acct["last"],
            "applying": self._running[account][0] if account in self._running else None,
        }

    async def op_cancel(self, p: dict[str, Any]) -> dict[str, Any]:
        account, version = str(p["account"]), int(p["version"])
        running = self._running.get(account)
        cancelled = self._cancel(account, version)
        if cancelled and running is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(running[1]), 60)
        return {"cancelled": cancelled, **(await self.op_status({"account": account}))}

    # -- reporting ---------------------------------------------------------------------

    async def _report_pending(self) -> None:
        for account, acct in list(self.state.items()):
            last = acct.get("last")
            if last is None or last.get("reported"):
                continue
            await self._report(account, last)

    async def _report(self, account: str, last: dict[str, Any]) -> None:
        body = {k: last.get(k) for k in ("state", "steps", "failed_step", "error", "tasks")}
        try:
            await self.agent.request(
                "POST",
                f"/v1/hosts/{self.agent.host}/deployments/{account}/{last['version']}/status",
                body,
            )
        except EdgevisorError as exc:
            log.info("deployment status not reported yet: %s", exc)
            return
        if last["state"] != "applying":
            last["reported"] = True
            self._save()

    # -- apply -------------------------------------------------------------------------

    async def _run(self, account: str, version: int, spec: dict[str, Any]) -> None:
        last: dict[str, Any] = {
            "version": version,
            "state": "applying",
            "steps": [],
            "failed_step": None,
            "error": None,
            "reported": False,
        }
        self._acct(account)["last"] = last
        self._save()
        try:
            await self._report(account, last)
            await self.apply(account, version, spec, last)
        finally:
            self._running.pop(account, None)
            self._cancelled.discard((account, version))
            self._save()
            self.poke()  # a version that superseded this one starts now, not at the next poll
            with contextlib.suppress(Exception):
                await asyncio.shield(self._report(account, last))

    async def apply(
        self, account: str, version: int, spec: dict[str, Any], last: dict[str, Any]
    ) -> None:
        """Apply one version; on failure or cancel undo and record why (never raises)."""
        steps: list[dict[str, Any]] = last["steps"]
        undo: list[tuple[str, Any]] = []
        coord = self.devices.coordinator()
        svc = self.devices._svc()
        good = self._acct(account)["good"]
        old_spec: dict[str, Any] = good["spec"] if good else {}
        current: dict[str, Any] | None = None

        def begin(name: str) -> dict[str, Any]:
            step = {"name": name, "state": "running", "error": None}
            steps.append(step)
            return step

        try:
            archives: dict[str, bytes] = {}
            for t in spec.get("tasks", []):
                current = begin(f"fetch task {t['name']}")
                raw = await self.agent.request(
                    "GET", f"/v1/hosts/{self.agent.host}/bundles/{t['bundle']}"
                )
                archives[t["name"]] = base64.b64decode(raw["archive_b64"])
                current["state"] = "done"
            for t in spec.get("tasks", []):
                current = begin(f"stage task {t['name']}")
                staged = qualified(account, t["name"]) + STAGED_SUFFIX
                try:
                    await coord.deploy(
                        archives[t["name"]], overrides={**t.get("overrides", {}), "name": staged}
                    )
                finally:
                    with contextlib.suppress(NotFound):
                        await coord.remove(staged)
                current["state"] = "done"
            current = begin("switch tasks")
            for t in spec.get("tasks", []):
                full = qualified(account, t["name"])
                undo.append(("task", (full, self._previous_task(coord, full))))
                await coord.deploy(
                    archives[t["name"]], overrides={**t.get("overrides", {}), "name": full}
                )
            current["state"] = "done"
            current = begin("devices")
            for dev in spec.get("devices", []):
                full = qualified(account, str(dev["name"]))
                if not svc.registry.exists(full):
                    svc.add_device(full, dev.get("password") or None)
                    undo.append(("device", full))
            current["state"] = "done"
            current = begin("routes")
            undo.append(("routes", self._route_snapshot(account)))
            for r in old_spec.get("routes", []):
                with contextlib.suppress(NotFound):
                    await svc.remove_route(qualified(account, str(r["name"])))
            for r in spec.get("routes", []):
                route = self.devices.qualify_route(account, dict(r))
                with contextlib.suppress(NotFound):
                    await svc.remove_route(route.name)
                await svc.add_route(route)
            current["state"] = "done"
            current = begin("timers")
            undo.append(("timers", self._timer_snapshot(account)))
            for tm in old_spec.get("timers", []):
                with contextlib.suppress(NotFound):
                    svc.remove_timer(qualified(account, str(tm["name"])))
            for tm in spec.get("timers", []):
                timer = self.devices.qualify_timer(account, dict(tm))
                with contextlib.suppress(NotFound):
                    svc.remove_timer(timer.name)
                svc.add_timer(timer)
            current["state"] = "done"
            kept = {str(d["name"]) for d in spec.get("devices", [])}
            gone = [str(d["name"]) for d in old_spec.get("devices", [])
                    if str(d["name"]) not in kept]  # fmt: skip
            if gone:
                current = begin("remove old devices")
                for name in gone:
                    full = qualified(account, name)
                    if not svc.registry.exists(full):
                        continue
                    # Credentials, certificate and shadow are kept in the undo entry, so a
                    # rollback brings the device back exactly as it was.
                    undo.append(("device_back", svc.export_device(full)))
                    svc.remove_device(full)  # closes its connections
                current["state"] = "done"
            new_names = {t["name"] for t in spec.get("tasks", [])}
            dropped = [t["name"] for t in old_spec.get("tasks", []) if t["name"] not in new_names]
            if dropped:
                current = begin("remove old tasks")
                for name in dropped:
                    with contextlib.suppress(NotFound):
                        await coord.remove(qualified(account, name))
                current["state"] = "done"
            self._acct(account)["good"] = {"version": version, "spec": spec}
            last["tasks"] = [
                task_json(coord.show(qualified(account, t["name"]))) for t in spec.get("tasks", [])
            ]
            last["state"] = "succeeded"
            log.info("deployment %s v%d applied", account, version)
        except asyncio.CancelledError:
            self._fail(last, current, "cancelled", "cancelled")
            await asyncio.shield(self._undo(account, undo))
            if (account, version) not in self._cancelled:
                raise  # the agent is stopping, not a cancel of this deployment
        except Exception as exc:
            msg = exc.message if isinstance(exc, EdgevisorError) else repr(exc)
            self._fail(last, current, "failed", msg)
            log.warning("deployment %s v%d failed at %s: %s", account, version,
                        last["failed_step"], msg)  # fmt: skip
            await self._undo(account, undo)

    @staticmethod
    def _fail(last: dict[str, Any], current: dict[str, Any] | None, state: str, error: str) -> None:
        last["state"] = state
        last["error"] = error
        if current is not None and current["state"] == "running":
            current["state"] = "failed"
            current["error"] = error
            last["failed_step"] = current["name"]

    def _previous_task(self, coord: Coordinator, full: str) -> tuple[bytes, dict[str, Any]] | None:
        try:
            tv: TaskVersion = coord.show(full)
        except NotFound:
            return None
        return coord.bundle_archive(tv.bundle), tv.spec.model_dump(mode="json")

    def _route_snapshot(self, account: str) -> list[Route]:
        routes = self.devices._svc().routes.routes
        return [r for n, r in routes.items() if split(n)[0] == account]

    def _timer_snapshot(self, account: str) -> list[Timer]:
        timers = self.devices._svc().timer_core.timers
        return [t for n, t in timers.items() if split(n)[0] == account]

    async def _undo(self, account: str, undo: list[tuple[str, Any]]) -> None:
        """Put back what a failed apply changed, newest first; each undo is best effort."""
        coord = self.devices.coordinator()
        svc = self.devices._svc()
        for kind, what in reversed(undo):
            try:
                if kind == "task":
                    full, prev = what
                    if prev is None:
                        with contextlib.suppress(NotFound):
                            await coord.remove(full)
                    else:
                        await coord.deploy(prev[0], overrides={**prev[1], "name": full})
                elif kind == "device":
                    with contextlib.suppress(NotFound):
                        svc.remove_device(what)
                elif kind == "device_back":
                    rec, shadow = what
                    if not svc.registry.exists(rec.name):
                        svc.restore_device(rec, shadow)
                elif kind == "routes":
                    for name in [n for n in svc.routes.routes if split(n)[0] == account]:
                        await svc.remove_route(name)
                    for route in what:
                        await svc.add_route(route)
                elif kind == "timers":
                    for name in [n for n in svc.timer_core.timers if split(n)[0] == account]:
                        svc.remove_timer(name)
                    for timer in what:
                        svc.add_timer(timer)
            except Exception:
                log.exception("deployment undo of %s failed", kind)
