"""The link-level half of a dataplane update: physical addresses, rules and routes.

A :class:`~edgevisor.network.dataplane.Dataplane` commits the translation in one nftables
transaction; what the kernel keeps outside nftables follows it here, over rtnetlink
(pyroute2): the ``/32`` (``/128``) physical addresses of local records on the fabric
interface, each account's ``fwmark -> table`` rule, and the ``logical -> veth`` route of
each local instance in its account's table. These steps are idempotent (an address or
route that is already as wanted is not an error) and never fail an update: what goes
wrong comes back as a warning, the agent reports it, and reconciliation repeats it.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from edgevisor.network.dp_core import AppliedRecord, Batch, DataplaneSettings
from edgevisor.network.netns import instance_ifname

__all__ = ["HostLinks"]

_AF = {4: 2, 6: 10}  # AF_INET, AF_INET6
_IFA_F_NODAD = 0x02
# EEXIST on add, ESRCH/EADDRNOTAVAIL/ENOENT on delete: already as wanted.
_AS_WANTED = (17, 3, 99, 2)

Address = IPv4Address | IPv6Address


class HostLinks:
    """Addresses, rules and routes of one host's dataplane, on the given rtnetlink handle
    (``ipr``, a pyroute2 ``IPRoute`` in the dataplane's namespace)."""

    def __init__(self, ipr: Any, settings: DataplaneSettings, fabric_index: int) -> None:
        self._ipr = ipr
        self.settings = settings
        self._fabric_index = fabric_index

    def apply(self, batch: Batch) -> list[str]:
        """The link-level work of a committed batch; the warnings."""
        warnings: list[str] = []
        for addr in batch.addr_del:
            warnings += self.addr("del", addr)
        for addr in batch.addr_add:
            warnings += self.addr("add", addr)
        for aid in batch.rule_del:
            warnings += self.rules("del", aid)
        for aid in batch.rule_add:
            warnings += self.rules("add", aid)
        for logical, aid in batch.route_del:
            warnings += _try(self._ipr.route, "del", dst=str(logical),
                             dst_len=logical.max_prefixlen, table=self._table_id(aid),
                             family=_AF[logical.version])
        for ifname, logical, aid in batch.route_add:
            warnings += self.route_add(ifname, logical, aid)
        return warnings

    def addr(self, cmd: str, addr: Address) -> list[str]:
        """A physical address on the fabric: ``/32``, or ``/128`` without duplicate
        detection (the controller hands each out once; tentative would drop traffic)."""
        if addr.version == 6:
            return _try(self._ipr.addr, cmd, index=self._fabric_index, address=str(addr),
                        prefixlen=128, family=_AF[6], flags=_IFA_F_NODAD)
        return _try(self._ipr.addr, cmd, index=self._fabric_index, address=str(addr),
                    prefixlen=32)

    def rules(self, cmd: str, aid: int) -> list[str]:
        """The account's ``fwmark -> table`` rule, for IPv4 and IPv6 alike."""
        out: list[str] = []
        for fam in (_AF[4], _AF[6]):
            out += _try(self._ipr.rule, cmd, fwmark=self.settings.mark_base | aid,
                        table=self._table_id(aid), priority=self.settings.rule_priority,
                        family=fam)
        return out

    def route_add(self, ifname: str, logical: Address, aid: int) -> list[str]:
        """The instance's ``logical -> veth`` route in its account's table (a warning if
        the veth is not there yet: :meth:`Dataplane.plug` adds it when it appears)."""
        idx = self._ipr.link_lookup(ifname=ifname)
        if not idx:
            return [f"instance link {ifname} for {logical} is not there yet"]
        if logical.version == 6:
            return _try(self._ipr.route, "replace", dst=str(logical), dst_len=128,
                        oif=idx[0], table=self._table_id(aid), family=_AF[6])
        return _try(self._ipr.route, "replace", dst=str(logical), dst_len=32,
                    oif=idx[0], table=self._table_id(aid), scope=253)

    def resync(
        self, records: Iterable[AppliedRecord], host: str, ids: dict[str, int]
    ) -> list[str]:
        """After a rebuild: make addresses, rules and routes match the records (those of
        ``host`` are local; ``ids``: account ids)."""
        warnings: list[str] = []
        local = [r for r in records if r.host == host]
        want = {r.physical for r in local}
        have: set[Address] = set()
        for msg in self._ipr.get_addr(index=self._fabric_index, family=_AF[4]):
            if msg["prefixlen"] == 32:
                have.add(IPv4Address(msg.get_attr("IFA_ADDRESS")))
        for msg in self._ipr.get_addr(index=self._fabric_index, family=_AF[6]):
            # Ours are /128 without DAD; the fabric's own (link-local /64, ...) are not.
            if msg["prefixlen"] == 128 and msg["flags"] & _IFA_F_NODAD:
                have.add(IPv6Address(msg.get_attr("IFA_ADDRESS")))
        for addr in sorted(have - want, key=str):
            warnings += self.addr("del", addr)
        for addr in sorted(want - have, key=str):
            warnings += self.addr("add", addr)
        # Rules at our priority and the routes of their tables are ours: recreate them.
        for fam in (_AF[4], _AF[6]):
            for rule in self._ipr.get_rules(family=fam):
                if rule.get_attr("FRA_PRIORITY") == self.settings.rule_priority:
                    table = rule.get_attr("FRA_TABLE")
                    warnings += _try(self._ipr.rule, "del",
                                     fwmark=rule.get_attr("FRA_FWMARK"), table=table,
                                     priority=self.settings.rule_priority, family=fam)
                    warnings += _try(self._ipr.flush_routes, table=table, family=fam)
        for aid in sorted({ids[r.account] for r in local}):
            warnings += self.rules("add", aid)
        for r in local:
            warnings += self.route_add(instance_ifname(r.account, r.logical), r.logical,
                                       ids[r.account])
        return warnings

    def _table_id(self, aid: int) -> int:
        return self.settings.route_table_base + aid


def _try(fn: Any, *args: Any, **kwargs: Any) -> list[str]:
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        if getattr(exc, "code", None) in _AS_WANTED:
            return []
        return [f"{args[0] if args else ''} {kwargs}: {exc}"]
    return []
