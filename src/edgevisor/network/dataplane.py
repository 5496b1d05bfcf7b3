"""The address-translation dataplane of one host.

Theory of operation
-------------------
Input is a set of address records (:class:`AppliedRecord`). Records whose ``host`` is this
host and that are ``active`` are *local* (their instance is a netns behind a veth here);
other active records are *remote* (peers of local instances). Preserved and released
records translate nothing.

Accounts may overlap logical ranges, so every packet carries its account as a firewall
mark (``mark_base | id``) and a conntrack zone (``id``), set at ``prerouting/raw`` from
the instance veth it came in on (``iif_acct``) or, from the fabric, from the local
physical address it is sent to (``phys_acct``). The account id is local to this host.
The mark selects the account's routing table (``ip rule fwmark M lookup table_base+id``)
holding ``logical/32 dev <veth>`` for local instances, so two accounts can each have
10.0.0.5 on one host. The zone keeps their conntrack tuples apart.

Translation for instance a -> logical b (same account):

- b local: no NAT; the account table routes to b's veth.
- b remote: ``dnat (mark . b) -> phys(b)`` (``out_dnat``), out the fabric with
  ``snat (mark . a) -> phys(a)`` (``out_snat``).
- On b's host: ``dnat phys(b) -> b`` (``in_dnat``) and ``snat (mark . phys(a)) -> a``
  (``in_snat``), so both ends see logical addresses.

Everything not matching is dropped in ``forward``: a packet to a local instance is
accepted only from the same account (``acct_if``) and, from the fabric, only from a
physical address of that account's known records (keys of ``in_snat``). Instances reach
the host itself only on granted ``proto . port`` pairs; spoofed source addresses are
dropped. Physical addresses of local records are ``/32`` addresses on the fabric
interface, so the kernel answers ARP for them; when one arrives here a gratuitous ARP is
sent.

IPv6: the same design in a second table of family ``ip6`` (same name, maps named with a
"6" suffix, ``ipv6_addr`` where the ``ip`` table has ``ipv4_addr``); a record goes to the
table of its family, and both tables are (re)made in one transaction. Translation keeps
the family (an IPv6 logical address has an IPv6 physical one; the controller refuses to
bind one without an IPv6 physical pool: IPv6 over an IPv4-only fabric is encapsulation
or NAT64, not a 1:1 map). IPv6 instances hold ``logical/128`` with a default route via
``fe80::1`` on the host-side veth; physical addresses are ``/128`` on the fabric without
duplicate detection; the account's ``fwmark`` rule exists for both families. Neighbour
discovery passes the ip6 chains untouched (no mark, NAT or spoofing check: its source is
link-local). Where IPv4 sends a gratuitous ARP, IPv6 sends an unsolicited neighbour
advertisement (:mod:`~edgevisor.network.garp`); the conntrack flush dumps every family
when a target is IPv6.

Updates: :func:`plan` (pure) turns (current records, changes) into a :class:`Batch` of
exact element deletes/adds plus the link-level work (addresses, routes, rules, conntrack
flushes, gratuitous ARPs). The element part is ONE kernel transaction: it applies
entirely or not at all, so a failed apply leaves the last good table. Only after it
succeeded does the in-memory state advance and the link-level work run. It goes to the
kernel as one nf_tables netlink batch encoded here (:mod:`~edgevisor.network.nft_netlink`,
~0.3 ms with the kernel's work) rather than as text through libnftables (~0.7-1.3 ms: it
parses the text and re-reads its cache first); a batch the netlink path refuses for a
reason it cannot name (not a missing or clashing element) is retried once as text
(:func:`render_batch`, the same operations in the same order).
:meth:`Dataplane.prepare` does the planning and encoding of a delta ahead of its commit
(the agent's ``records.prepare``, while the controller waits for another host) and
touches nothing; :meth:`Dataplane.commit` given that :class:`Prepared` sends its bytes as
they are when nothing changed in between (``Dataplane.version`` and the netlink sequence
number are those it was made at, and the records are the same), and plans afresh
otherwise.
:meth:`Dataplane.rebuild` drops and recreates the table with all elements in one
transaction (agent restart: state comes from records, not memory).

Old flows (fencing). A remap does not move flows that exist: their conntrack entries keep
the old translation. They are cut in the update's own transaction, not after it, and
deleted after it by kernel-filtered deletes. The fence is kept per *key* (zone, address):
each key has a *phase*, 0-3 (its two bits: the key is in the hash sets ``phase_a`` /
``phase_b``; absent from both: 0). A new instance flow takes, at ``forward``, the phase of
the key of its original source and of its original destination into its conntrack mark
(two bits per side, :data:`~edgevisor.network.conntrack.PHASE_SHIFT`). An update that
changes or removes a mapping moves each old key (the logical and the physical address in
the record's zone: exactly the conntrack cleanup's targets) to its next phase and adds
``zone . address . phase so far`` to the hash set ``stale``, in the same transaction as
the maps; a packet of an existing flow is dropped when ``zone . original src (dst) .
its phase of that side`` is in ``stale``. So flows opened before the update stop at its
commit, flows opened after it carry the new phase and pass. The cleanup then runs off
the critical path: in the key's zone, with the address on that side of the original
tuple, and that side's phase equal to the stale one (a mark/mask equality the kernel's
filtered delete expresses exactly, see :mod:`~edgevisor.network.conntrack`); a new flow
opened in between carries another phase and survives. A stale element goes with the next
transaction once its cleanup succeeded.

Four phases let a key be fenced three times before a cleanup must have run (the agent
cleans up in windows, and a record moving back and forth fences its keys on every move).
A fence that brings a key back to a phase whose stale element is not cleaned
(``Batch.refence``) first runs that cleanup itself, under the cleanup lock, and fails
(table unchanged) if it cannot; the element goes in the same transaction. A rebuild keeps
the phases and the pending stale elements (flows keep their phases across it) and then
runs the pending cleanups; a new dataplane reads both back from the kernel table, so an
agent restart continues the fence. Every key starts in phase 0, and flows marked before
(no phase bits) read as phase 0.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Literal

from edgevisor.errors import UnavailableError
from edgevisor.network.conntrack import ConntrackFlusher, FlushTarget, phase_of
from edgevisor.network.conntrack import Path as ConntrackPath
from edgevisor.network.dp_core import (
    AppliedRecord,
    Batch,
    DataplaneSettings,
    Key,
    StaleElem,
    StaleKey,
    assign_ids,
    count_accounts,
    element_lists,
    fence_lists,
    plan,
    render_batch,
    render_table,
)
from edgevisor.network.dp_links import HostLinks
from edgevisor.network.garp import GarpSender
from edgevisor.network.netns import instance_ifname
from edgevisor.network.nft import Nft, NftError, NftSocket
from edgevisor.network.nft_netlink import (
    EncodedBatch,
    NetlinkBatchError,
    UnsupportedBatch,
    encode_batch,
)

__all__ = [
    "AppliedRecord",
    "ApplyFailed",
    "ApplyResult",
    "Batch",
    "Dataplane",
    "DataplaneSettings",
    "Key",
    "Pending",
    "Prepared",
    "StaleElem",
    "StaleKey",
    "assign_ids",
    "count_accounts",
    "element_lists",
    "plan",
    "render_batch",
    "render_table",
]

log = logging.getLogger(__name__)


class ApplyFailed(UnavailableError):
    """The host could not apply the records; the last good table stays in place."""

    code = "dataplane_apply_failed"


# --- I/O shell ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one apply did. ``committed_s``: from the call until the new translation was in
    the kernel (new connections use it); ``total_s``: until addresses, gratuitous ARPs and
    the conntrack flush (old flows cut) were done too."""

    generation: int
    element_ops: int
    conntrack_deleted: int
    warnings: tuple[str, ...] = ()
    committed_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Prepared:
    """A delta planned (and encoded) ahead of its commit (see :meth:`Dataplane.prepare`):
    valid while the dataplane's ``version`` and netlink sequence number are unchanged."""

    records: tuple[AppliedRecord, ...]
    version: int
    seq: int | None  # the netlink socket's next sequence number; None: no socket
    batch: Batch
    encoded: EncodedBatch | None  # None: the batch goes as text


@dataclass(frozen=True, slots=True)
class Pending:
    """A committed update whose link-level work is still to do (see :meth:`Dataplane.commit`)."""

    batch: Batch
    started: float
    committed_s: float


class Dataplane:
    """The translation tables, addresses and routes of one host.

    ``netns`` is the namespace to act in (``None``: the caller's own, the agent's case).
    ``element_path`` is how incremental element batches reach the kernel: ``"netlink"``
    (encoded here, one ``sendmsg``; libnftables if the socket cannot be used) or
    ``"text"`` (libnftables). ``conntrack_path`` is how the cleanup deletes entries (see
    :class:`~edgevisor.network.conntrack.ConntrackFlusher`). Not thread-safe; the agent
    applies updates one at a time (only :meth:`flush_stale` may run beside them).
    """

    def __init__(self, host: str, settings: DataplaneSettings, netns: str | None = None,
                 *, element_path: Literal["netlink", "text"] = "netlink",
                 conntrack_path: ConntrackPath = "auto") -> None:
        from pyroute2 import IPRoute

        self.host = host
        self.settings = settings
        self.netns = netns
        self.records: dict[Key, AppliedRecord] = {}
        self.ids: dict[str, int] = {}
        self.counts: dict[str, tuple[int, int]] = {}
        self.generation = 0
        self.last_error: str | None = None
        # The fence of old flows (see the theory of operation): fences so far, the stale
        # elements (-> the fence that made them) and those whose cleanup is done (they
        # go with the next commit), each key's phase (absent: 0), and per element the
        # fence whose cleanup succeeded (equal to the element's: cleaned).
        self.epoch = 1
        self.stale: dict[StaleElem, int] = {}
        self.stale_done: set[StaleElem] = set()
        self.phase: dict[StaleKey, int] = {}
        self._cleaned: dict[StaleElem, int] = {}
        # Moves on with every change of what plan() reads (a Prepared is then stale).
        self.version = 0
        self._nft = Nft(netns)
        self._nl: NftSocket | None = None
        if element_path == "netlink":
            try:
                self._nl = NftSocket(netns)
            except NftError as exc:
                log.warning("dataplane %s: element updates through libnftables: %s", host,
                            exc.message)
        self._ipr: Any = IPRoute(netns=netns) if netns else IPRoute()
        self._ct = ConntrackFlusher(netns, path=conntrack_path)
        self._flush_lock = threading.Lock()
        self._garp = GarpSender(settings.fabric_if, netns)
        idx = self._ipr.link_lookup(ifname=settings.fabric_if)
        if not idx:
            raise ApplyFailed(f"fabric interface {settings.fabric_if} not found")
        self._fabric_index: int = idx[0]
        self.links = HostLinks(self._ipr, settings, self._fabric_index)
        self._kernel_fence()

    def _kernel_fence(self) -> None:
        """The fence of a table an earlier process left: its keys' phases (flows carry
        them) and stale elements (their cleanup is not known to be done)."""
        for fam, f in (("ip", ""), ("ip6", "6")):
            for bit, name in ((1, "phase_a"), (2, "phase_b")):
                for key, _mark in self._kernel_keys(fam, name + f):
                    self.phase[key] = self.phase.get(key, 0) | bit
            for key, mark in self._kernel_keys(fam, "stale" + f):
                # An element keeps its phase where one side's flows do (both 0: phase 0).
                self.stale[(key, phase_of(mark, "dst") or phase_of(mark, "src"))] = 0

    def _kernel_keys(self, family: str, name: str) -> list[tuple[StaleKey, int]]:
        """(key, mark or 0) of the elements of a fence set in the kernel table."""
        try:
            data = self._nft.query(f"list set {family} {self.settings.table} {name}")
        except NftError:
            return []  # no table (or one without the set): nothing to continue
        keys: list[tuple[StaleKey, int]] = []
        for item in (data or {}).get("nftables", []):
            for elem in item.get("set", {}).get("elem", []):
                concat = elem.get("concat") if isinstance(elem, dict) else None
                if not isinstance(concat, list) or len(concat) not in (2, 3):
                    continue
                mark = concat[2] if len(concat) == 3 else 0
                if isinstance(mark, int):  # not a range: an older table's interval set
                    keys.append(((int(concat[0]), ip_address(str(concat[1]))), mark))
        return keys

    def close(self) -> None:
        self._nft.close()
        if self._nl is not None:
            self._nl.close()
        self._ipr.close()
        self._ct.close()
        self._garp.close()

    # -- public operations --

    def rebuild(self, records: Iterable[AppliedRecord]) -> ApplyResult:
        """Drop and recreate the table from ``records`` in one transaction."""
        # A table of 100,000 records makes ~100,000 tracked tuples on top of the records:
        # the cyclic collector would walk them all several times (~0.1 s), and none of it
        # is cyclic garbage. Process-wide, for the rebuild's second or so: harmless.
        was = gc.isenabled()
        gc.disable()
        try:
            return self._rebuild(records)
        finally:
            if was:
                gc.enable()

    def _rebuild(self, records: Iterable[AppliedRecord]) -> ApplyResult:
        t0 = time.perf_counter()
        desired: dict[Key, AppliedRecord] = {}
        for r in records:
            if r.state == "active":
                desired[r.key] = r
        phys = [r.physical for r in desired.values() if r.host == self.host]
        if len(phys) != len(set(phys)):
            raise ApplyFailed("two local records share a physical address")
        try:
            ids = assign_ids({}, {k[0] for k in desired})
        except ValueError as exc:
            raise ApplyFailed(str(exc)) from exc
        # The fence stays: flows keep their phase bits across the rebuild. Stale keys whose
        # cleanup is done are left out (their elements would go with the next commit).
        for elem in self.stale_done:
            self.stale.pop(elem, None)
            self._cleaned.pop(elem, None)
        self.stale_done.clear()
        text = render_table(self.settings, {
            **element_lists(desired, self.host, ids, self.settings),
            **fence_lists(self.stale, self.phase),
        })
        self._run(text)
        committed = time.perf_counter() - t0
        self.version += 1
        old_local = {r.physical for r in self.records.values() if r.host == self.host}
        self.records, self.ids = desired, ids
        self.counts = count_accounts(desired, self.host)
        self.generation = max([0, *(r.generation for r in desired.values())])
        warnings = self.links.resync(self.records.values(), self.host, self.ids)
        warnings += self._announce(sorted(
            {r.physical for r in desired.values() if r.host == self.host} - old_local, key=str))
        # Pending cleanups (of fences before the rebuild, or of an earlier process): now,
        # so their stale elements go with the next commit.
        deleted = 0
        pending = [e for e in self.stale if not self._is_cleaned(e)]
        if pending:
            with self._flush_lock:
                try:
                    deleted = self._clean(pending)
                except UnavailableError as exc:
                    warnings.append(f"conntrack cleanup of the kept fence: {exc}")
            self._mark_done(pending)
        return ApplyResult(self.generation, len(desired), deleted, tuple(warnings),
                           committed, time.perf_counter() - t0)

    def apply(self, records: Iterable[AppliedRecord], *, full: bool = False) -> ApplyResult:
        """Apply records: a delta (default) or, with ``full``, the whole desired set.

        In a delta, a record in state preserved/released removes its mapping. Raises
        :class:`ApplyFailed` with the table unchanged when the transaction is refused.
        """
        return self.finish(self.commit(records, full=full))

    def commit(
        self, records: Iterable[AppliedRecord], *, full: bool = False,
        prepared: Prepared | None = None,
    ) -> Pending:
        """The first half of :meth:`apply`: the translation, in one nftables transaction.

        New connections use it once this returns, and flows opened to a changed mapping
        before it are dropped (the ``stale`` fence, same transaction). The caller must
        run :meth:`finish` on the result (addresses, routes, conntrack cleanup, gratuitous
        ARPs) before the next ``commit``; the agent does that after answering.
        ``prepared``: :meth:`prepare` of the same delta, used as it is if still valid.
        """
        t0 = time.perf_counter()
        recs = tuple(records)
        batch: Batch | None = None
        encoded: EncodedBatch | None = None
        if prepared is not None and not full and self._still_valid(prepared, recs):
            batch, encoded = prepared.batch, prepared.encoded
        if batch is None:
            batch = self._plan(recs, full=full)
        # A key back to a phase whose cleanup has not run: that cleanup first (the phase's
        # flows and the new ones would look alike), and no other cleanup until this commit
        # changed the fence.
        with self._flush_lock if batch.refence else contextlib.nullcontext():
            if batch.refence:
                try:
                    self._clean(batch.refence)
                except UnavailableError as exc:
                    self.last_error = f"conntrack cleanup before a second fence failed: {exc}"
                    raise ApplyFailed(f"host {self.host}: {self.last_error}") from exc
            if batch.element_ops or batch.stale_add or batch.stale_del:
                self._elements(batch, encoded)
            committed = time.perf_counter() - t0
            self._commit(batch)
        return Pending(batch, t0, committed)

    def prepare(self, records: Iterable[AppliedRecord]) -> Prepared | None:
        """Plan and encode the delta ``records`` now, touching nothing (no kernel change,
        no state change), for a later :meth:`commit` of the same records; None if it
        cannot be done ahead (the commit then plans and reports the error itself)."""
        recs = tuple(records)
        seq = self._nl.seq if self._nl is not None else None
        try:
            batch = self._plan_changes(self._changes(recs, full=False))
            encoded = (encode_batch(batch, self.settings.table, seq)
                       if seq is not None else None)
        except (ValueError, UnsupportedBatch):
            return None
        return Prepared(recs, self.version, seq, batch, encoded)

    def _still_valid(self, prepared: Prepared, records: tuple[AppliedRecord, ...]) -> bool:
        seq = self._nl.seq if self._nl is not None else None
        return (prepared.version == self.version and prepared.seq == seq
                and prepared.records == records)

    def _changes(
        self, records: tuple[AppliedRecord, ...], *, full: bool
    ) -> dict[Key, AppliedRecord | None]:
        given = {r.key: r for r in records}
        changes: dict[Key, AppliedRecord | None] = {
            k: v for k, v in given.items() if self.records.get(k) != v
        }
        if full:
            for k in self.records.keys() - given.keys():
                changes[k] = None
        return changes

    def _plan_changes(self, changes: dict[Key, AppliedRecord | None]) -> Batch:
        return plan(self.records, changes, host=self.host, ids=self.ids, counts=self.counts,
                    settings=self.settings, generation=self.generation, epoch=self.epoch,
                    stale=self.stale, stale_done=self.stale_done, phase=self.phase)

    def _plan(self, records: tuple[AppliedRecord, ...], *, full: bool) -> Batch:
        try:
            return self._plan_changes(self._changes(records, full=full))
        except ValueError as exc:
            self.last_error = str(exc)
            raise ApplyFailed(str(exc)) from exc

    def finish(self, pending: Pending) -> ApplyResult:
        """The second half of :meth:`apply`: :meth:`finish_links`, then the conntrack
        cleanup of the flows the commit fenced off (:meth:`flush_stale`, :meth:`flushed`)."""
        warnings = self.finish_links(pending)
        deleted, warning = self.flush_stale(pending)
        if warning is None:
            self.flushed(pending)
        else:
            warnings.append(warning)
        if warnings:
            log.warning("dataplane %s: %s", self.host, "; ".join(warnings))
        return ApplyResult(pending.batch.generation, pending.batch.element_ops, deleted,
                           tuple(warnings), pending.committed_s,
                           time.perf_counter() - pending.started)

    def finish_links(self, pending: Pending) -> list[str]:
        """Addresses, rules, routes and gratuitous ARPs of a commit; the warnings. Must run
        before the next :meth:`commit`."""
        batch = pending.batch
        return self.links.apply(batch) + self._announce(batch.garp)

    def _announce(self, addrs: Iterable[IPv4Address | IPv6Address]) -> list[str]:
        """Gratuitous ARPs (unsolicited NAs) for physical addresses that arrived here."""
        warnings: list[str] = []
        for addr in addrs:
            try:
                self._garp.send(addr, self.settings.garp_count)
            except OSError as exc:
                warnings.append(f"gratuitous ARP for {addr}: {exc}")
        return warnings

    def flush_stale(self, pending: Pending) -> tuple[int, str | None]:
        """Delete the conntrack entries the commit fenced off: (deleted, warning if it
        failed). Cleanup only (the fence already stops those flows), so it may run
        concurrently with later commits; flushes are serialized among themselves."""
        return self.flush_stale_many([pending])

    def flush_stale_many(self, pendings: Iterable[Pending]) -> tuple[int, str | None]:
        """:meth:`flush_stale` of several commits at once: the stale elements they added
        that are still there and not cleaned (a later commit may have cleaned one itself)."""
        elems: dict[StaleElem, None] = {}
        for pending in pendings:
            elems.update(dict.fromkeys(pending.batch.stale_add))
        if not elems:
            return 0, None
        with self._flush_lock:
            # Under the lock, a commit that removes one of these elements waits (refence).
            todo = [e for e in elems if e in self.stale and not self._is_cleaned(e)]
            try:
                return self._clean(todo), None
            except UnavailableError as exc:
                return 0, str(exc)  # the fence stays until a later change replaces it

    def flushed(self, pending: Pending) -> None:
        """Note that :meth:`flush_stale` of ``pending`` succeeded: its stale elements that
        are cleaned go with the next commit. Call it where commits are serialized."""
        self._mark_done(pending.batch.stale_add)

    def _is_cleaned(self, elem: StaleElem) -> bool:
        fence = self.stale.get(elem)
        return fence is not None and self._cleaned.get(elem) == fence

    def _mark_done(self, elems: Iterable[StaleElem]) -> None:
        done = {e for e in elems if self._is_cleaned(e)}
        if not done <= self.stale_done:
            self.stale_done.update(done)
            self.version += 1

    def _clean(self, elems: Iterable[StaleElem]) -> int:
        """Delete the flows of the stale elements ``elems``, both sides, and note each as
        cleaned; the caller holds the cleanup lock. Raises
        :class:`~edgevisor.errors.UnavailableError` (nothing noted) when it fails."""
        fences = {e: self.stale[e] for e in elems if e in self.stale and not self._is_cleaned(e)}
        if not fences:
            return 0
        bounds: dict[FlushTarget, set[int]] = {}
        for ((zone, addr), ph) in fences:
            for side in ("src", "dst"):
                bounds.setdefault(FlushTarget(zone, side, addr), set()).add(ph)
        deleted = self._ct.flush_bounded(bounds)
        for elem, fence in fences.items():
            self._cleaned[elem] = fence
        return deleted

    def plug(self, account: str, logical: IPv4Address | IPv6Address) -> None:
        """(Re)install the route of a local instance whose veth appeared after apply."""
        r = self.records.get((account, logical))
        if r is not None and r.host == self.host:
            self.links.route_add(instance_ifname(account, logical), logical,
                                 self.ids[account])

    def table_elements(self) -> dict[str, list[Any]]:
        """Current kernel elements per map/set (for checks and the agent's report)."""
        out: dict[str, list[Any]] = {}
        for fam in ("ip", "ip6"):
            data = self._nft.query(f"list table {fam} {self.settings.table}")
            for item in data.get("nftables", []):
                for kind in ("map", "set"):
                    if kind in item:
                        out[item[kind]["name"]] = item[kind].get("elem", [])
        return out

    # -- internals --

    def _commit(self, batch: Batch) -> None:
        for key, rec in batch.updates.items():
            if rec is None:
                self.records.pop(key, None)
            else:
                self.records[key] = rec
        for account, count in batch.counts.items():
            if count[0] > 0:
                self.counts[account] = count
            else:
                self.counts.pop(account, None)
        self.ids, self.generation = batch.ids, batch.generation
        for elem in batch.stale_del:
            self.stale.pop(elem, None)
            self.stale_done.discard(elem)
            self._cleaned.pop(elem, None)
        for elem in batch.stale_add:
            self.stale[elem] = batch.epoch
            self.stale_done.discard(elem)
        for sk, (_old, new) in batch.phase_moves.items():
            if new:
                self.phase[sk] = new
            else:
                self.phase.pop(sk, None)
        self.epoch = batch.epoch
        self.version += 1

    def _elements(self, batch: Batch, encoded: EncodedBatch | None = None) -> None:
        """The element part of ``batch``, one transaction: netlink (``encoded`` if made
        beforehand for the socket's current sequence number), else (or once after a
        refusal netlink cannot name) libnftables text. Raises :class:`ApplyFailed`."""
        if self._nl is not None:
            if encoded is None:
                try:
                    encoded = encode_batch(batch, self.settings.table, self._nl.seq)
                except UnsupportedBatch as exc:
                    log.warning("dataplane %s: batch as text: %s", self.host, exc)
            if encoded is not None:
                try:
                    self._nl.commit(encoded)
                except NetlinkBatchError as exc:
                    if exc.mapped or not exc.fallback_ok:
                        self.last_error = exc.message
                        raise ApplyFailed(f"host {self.host}: {exc.message}",
                                          details=exc.details) from exc
                    log.warning("dataplane %s: netlink batch refused, retrying it as text: %s",
                                self.host, exc.message)
                else:
                    self.last_error = None
                    return
        self._run(render_batch(batch, self.settings.table))

    def _run(self, text: str) -> None:
        try:
            self._nft.run(text)
        except NftError as exc:
            self.last_error = exc.message
            raise ApplyFailed(f"host {self.host}: {exc.message}", details=exc.details) from exc
        self.last_error = None
