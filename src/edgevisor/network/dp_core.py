"""Pure core of the host dataplane: which nftables elements, addresses, routes, rules,
conntrack flushes, stale-flow fences and gratuitous ARPs an update needs. No I/O; see
``dataplane.py`` for the theory of operation and the shell that performs a :class:`Batch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from socket import inet_ntoa
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgevisor.network.conntrack import PHASE_SHIFT, PHASES, FlushTarget, flush_targets
from edgevisor.network.netns import instance_ifname

__all__ = [
    "AppliedRecord",
    "Batch",
    "DataplaneSettings",
    "Key",
    "StaleElem",
    "StaleKey",
    "assign_ids",
    "count_accounts",
    "element_lists",
    "fence_lists",
    "plan",
    "render_batch",
    "render_table",
]

RecordState = Literal["active", "preserved", "released"]
IPAddress = IPv4Address | IPv6Address
Key = tuple[str, IPAddress]  # (account, logical)
StaleKey = tuple[int, IPAddress]  # (conntrack zone = account id, logical or physical)
StaleElem = tuple[StaleKey, int]  # a key's flows of one phase (0-3) are stale
MAX_ACCOUNTS = 0xFFFF  # conntrack zones are 16 bits


class DataplaneSettings(BaseModel):
    """Settings of the host dataplane (section ``network.dataplane``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: str = Field("edgevisor", description="nftables table (family ip) owned by the agent")
    fabric_if: str = Field(..., description="interface facing the other hosts")
    mark_base: int = Field(
        0x45560000,
        description="firewall marks used are mark_base | account id; low 16 bits must be 0",
    )
    route_table_base: int = Field(
        0x4556_0000, description="routing table of account id N is route_table_base + N"
    )
    rule_priority: int = Field(
        1000, description="priority of the per-account `ip rule fwmark` entries"
    )
    granted_tcp_ports: tuple[int, ...] = Field(
        (), description="host TCP ports instances may reach on the host itself"
    )
    garp_count: int = Field(2, description="gratuitous ARPs sent when a physical arrives")


@dataclass(frozen=True, slots=True)
class AppliedRecord:
    """One network address record as the dataplane needs it."""

    account: str
    logical: IPAddress
    physical: IPAddress
    host: str
    generation: int
    state: RecordState = "active"

    def __post_init__(self) -> None:
        # 1:1 NAT keeps the family: an IPv6 logical address needs an IPv6 physical one
        # (the controller refuses to bind one without an IPv6 physical pool).
        if self.state == "active" and self.logical.version != self.physical.version:
            raise ValueError(f"logical {self.logical} and physical {self.physical} are of "
                             "different IP versions; translation is 1:1 within one family")

    @property
    def v6(self) -> bool:
        return self.logical.version == 6

    @property
    def key(self) -> Key:
        return (self.account, self.logical)

    @classmethod
    def from_record(cls, record: Any) -> AppliedRecord:
        """Adapt anything with the record's attribute names (e.g. the store's Record)."""
        return cls(
            account=str(record.account),
            logical=ip_address(str(record.logical)),
            physical=ip_address(str(record.physical)),
            host=str(record.host),
            generation=int(record.generation),
            state=record.state,
        )


# --- pure core ---------------------------------------------------------------------------

Elements = dict[tuple[str, str], str | None]  # (map or set name, key text) -> value text


def _mark(settings: DataplaneSettings, aid: int) -> str:
    return f"0x{settings.mark_base | aid:08x}"


def _record_elements(
    r: AppliedRecord, host: str, aid: int, settings: DataplaneSettings
) -> Elements:
    """Map/set elements one active record contributes on ``host``."""
    m = _mark(settings, aid)
    f = "6" if r.v6 else ""  # IPv6 records live in the ip6 table's maps (name + "6")
    if r.host == host:
        ifn = f'"{instance_ifname(r.account, r.logical)}"'
        return {
            ("iif_acct" + f, ifn): m,
            ("iif_zone" + f, ifn): str(aid),
            ("phys_acct" + f, str(r.physical)): m,
            ("phys_zone" + f, str(r.physical)): str(aid),
            ("acct_if" + f, f"{m} . {ifn}"): None,
            ("if_addr" + f, f"{ifn} . {r.logical}"): None,
            ("local_logical" + f, f"{m} . {r.logical}"): None,
            ("out_snat" + f, f"{m} . {r.logical}"): str(r.physical),
            ("in_dnat" + f, str(r.physical)): str(r.logical),
        }
    return {
        ("out_dnat" + f, f"{m} . {r.logical}"): str(r.physical),
        ("in_snat" + f, f"{m} . {r.physical}"): str(r.logical),
    }


def assign_ids(existing: Mapping[str, int], accounts: Iterable[str]) -> dict[str, int]:
    """Host-local account ids: kept while the account is present, lowest free id for new.

    Raises ValueError when more than 65,535 accounts would be present.
    """
    wanted = set(accounts)
    ids = {a: i for a, i in existing.items() if a in wanted}
    used = set(ids.values())
    nxt = 1
    for account in sorted(wanted - ids.keys()):
        while nxt in used:
            nxt += 1
        if nxt > MAX_ACCOUNTS:
            raise ValueError(f"more than {MAX_ACCOUNTS} accounts on one host")
        ids[account] = nxt
        used.add(nxt)
    return ids


@dataclass
class Batch:
    """Everything one update does; the element part is one nftables transaction."""

    deletes: dict[str, list[str]] = field(default_factory=dict)
    adds: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    addr_add: list[IPAddress] = field(default_factory=list)
    addr_del: list[IPAddress] = field(default_factory=list)
    route_add: list[tuple[str, IPAddress, int]] = field(default_factory=list)  # if, dst, id
    route_del: list[tuple[IPAddress, int]] = field(default_factory=list)
    rule_add: list[int] = field(default_factory=list)  # account ids
    rule_del: list[int] = field(default_factory=list)
    flush: set[FlushTarget] = field(default_factory=set)
    garp: list[IPAddress] = field(default_factory=list)  # ARP (v4) or NA (v6) to send
    ids: dict[str, int] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # touched accounts only
    updates: dict[Key, AppliedRecord | None] = field(default_factory=dict)
    generation: int = 0
    # The fence of old flows (see "Old flows" in dataplane.py), in the same transaction as
    # the maps: the fence number after this batch (one more per fencing batch), the stale
    # elements (key, phase) that go and come, and each fenced key's phase change (old,
    # new). ``refence``: stale elements of the phase a key returns to whose cleanup is
    # not done (a fourth fence before the cleanup): it must run before this commit.
    epoch: int = 1
    stale_del: list[StaleElem] = field(default_factory=list)
    stale_add: list[StaleElem] = field(default_factory=list)
    phase_moves: dict[StaleKey, tuple[int, int]] = field(default_factory=dict)
    refence: list[StaleElem] = field(default_factory=list)

    @property
    def element_ops(self) -> int:
        return sum(map(len, self.deletes.values())) + sum(map(len, self.adds.values()))


def _active(r: AppliedRecord | None) -> AppliedRecord | None:
    return r if r is not None and r.state == "active" else None


def count_accounts(
    records: Mapping[Key, AppliedRecord], host: str
) -> dict[str, tuple[int, int]]:
    """Per account: (active records, of which local to ``host``)."""
    out: dict[str, tuple[int, int]] = {}
    for r in records.values():
        total, local = out.get(r.account, (0, 0))
        out[r.account] = (total + 1, local + (r.host == host))
    return out


def plan(
    current: Mapping[Key, AppliedRecord],
    changes: Mapping[Key, AppliedRecord | None],
    *,
    host: str,
    ids: Mapping[str, int],
    counts: Mapping[str, tuple[int, int]],
    settings: DataplaneSettings,
    generation: int = 0,
    epoch: int = 1,
    stale: AbstractSet[StaleElem] | Mapping[StaleElem, object] = frozenset(),
    stale_done: Iterable[StaleElem] = (),
    phase: Mapping[StaleKey, int] | None = None,
) -> Batch:
    """Exact work to go from ``current`` (active records) to it updated by ``changes``.

    ``changes`` maps a key to its new record (any state) or ``None`` (gone); ``counts``
    is :func:`count_accounts` of ``current``. Only changed keys are looked at, so a
    one-record remap costs O(1) however large the table. The fence: ``epoch`` counts the
    fences so far, ``stale`` holds the stale elements (key, phase), ``stale_done`` those
    of them whose conntrack entries are gone (their elements are dropped) and ``phase``
    each key's phase (absent: 0). Raises ValueError on input the dataplane cannot honour
    (two local records given one physical address in one batch).
    """
    touched: list[tuple[AppliedRecord | None, AppliedRecord | None]] = []
    batch = Batch()
    new_counts: dict[str, tuple[int, int]] = {}
    for key, new in changes.items():
        if new is not None and new.key != key:
            raise ValueError(f"record {new} filed under key {key}")
        old = _active(current.get(key))
        new_a = _active(new)
        if old == new_a:
            continue
        touched.append((old, new_a))
        batch.updates[key] = new_a
        total, local = new_counts.get(key[0], counts.get(key[0], (0, 0)))
        if old is not None:
            total, local = total - 1, local - (old.host == host)
        if new_a is not None:
            total, local = total + 1, local + (new_a.host == host)
        new_counts[key[0]] = (total, local)

    appeared = any(a not in ids for a, (t, _) in new_counts.items() if t > 0)
    vanished = any(t == 0 for t, _ in new_counts.values())
    if appeared or vanished:
        present = {a for a, (t, _) in counts.items() if t > 0 and a not in new_counts}
        present |= {a for a, (t, _) in new_counts.items() if t > 0}
        batch.ids = assign_ids(ids, present)
    else:
        batch.ids = dict(ids)
    new_ids = batch.ids
    batch.counts = new_counts

    old_el: Elements = {}
    new_el: Elements = {}
    phys_seen: dict[IPAddress, Key] = {}
    for old, new in touched:
        if old is not None:
            old_el.update(_record_elements(old, host, ids[old.account], settings))
        if new is not None:
            if new.host == host:
                other = phys_seen.setdefault(new.physical, new.key)
                if other != new.key:
                    raise ValueError(f"physical {new.physical} given to {other} and {new.key}")
            new_el.update(_record_elements(new, host, new_ids[new.account], settings))
    for (name, k), v in old_el.items():
        if (name, k) not in new_el or new_el[(name, k)] != v:
            batch.deletes.setdefault(name, []).append(k)
    for (name, k), v in new_el.items():
        if (name, k) not in old_el or old_el[(name, k)] != v:
            batch.adds.setdefault(name, []).append((k, v))

    for old, new in touched:
        was_local = old is not None and old.host == host
        is_local = new is not None and new.host == host
        if old is not None and (
            new is None or old.host != new.host or old.physical != new.physical
        ):
            batch.flush |= flush_targets(ids[old.account], old.logical, old.physical)
        if old is not None and was_local and not (
            new is not None and is_local and new.physical == old.physical
        ):
            batch.addr_del.append(old.physical)
        if new is not None and is_local and not (
            old is not None and was_local and old.physical == new.physical
        ):
            batch.addr_add.append(new.physical)
            batch.garp.append(new.physical)
        if old is not None and was_local and not is_local:
            batch.route_del.append((old.logical, ids[old.account]))
        if new is not None and is_local and not was_local:
            batch.route_add.append(
                (instance_ifname(new.account, new.logical), new.logical,
                 new_ids[new.account]))

    for account, (_, local) in sorted(new_counts.items()):
        before = counts.get(account, (0, 0))[1]
        if before == 0 and local > 0:
            batch.rule_add.append(new_ids[account])
        elif before > 0 and local == 0:
            batch.rule_del.append(ids[account])
    # An address deleted and added again in one batch (a swap between records) stays.
    both = set(batch.addr_del) & set(batch.addr_add)
    batch.addr_del = [a for a in batch.addr_del if a not in both]
    # The applied generation covers every record given, removals (preserved) included.
    batch.generation = max([generation, *(r.generation for r in changes.values() if r)])
    _fence(batch, epoch, stale, set(stale_done), phase or {})
    return batch


def _fence(
    batch: Batch, epoch: int, stale: AbstractSet[StaleElem] | Mapping[StaleElem, object],
    done: AbstractSet[StaleElem], phase: Mapping[StaleKey, int],
) -> None:
    """Flows of a changed mapping become stale in the batch's own transaction: each key
    (zone, flushed address) moves to its next phase, and its flows of the phase so far
    (every flow opened since the last fence) are dropped; new flows carry the new phase.
    A stale element of the phase a key returns to goes in the same transaction (its
    cleanup must be done by then: ``refence``). Elements whose cleanup is done go."""
    batch.epoch = epoch
    if batch.flush:
        batch.epoch = epoch + 1
        # Keyed: one batch may flush IPv4 and IPv6 targets of a zone, and addresses of
        # two versions do not compare.
        keys = sorted({(t.zone, t.address) for t in batch.flush},
                      key=lambda k: (k[0], k[1].version, k[1].packed))
        for key in keys:
            cur = phase.get(key, 0)
            new = (cur + 1) % PHASES
            batch.stale_add.append((key, cur))
            if (key, new) in stale:
                batch.stale_del.append((key, new))
                if (key, new) not in done:
                    batch.refence.append((key, new))
            batch.phase_moves[key] = (cur, new)
    gone = set(batch.stale_del)
    for elem in sorted(done & set(stale) - gone, key=_elem_order):
        batch.stale_del.append(elem)


def _elem_order(elem: StaleElem) -> tuple[int, int, bytes, int]:
    (zone, addr), ph = elem
    return (zone, addr.version, addr.packed, ph)


def render_batch(batch: Batch, table: str) -> str:
    """The element part of ``batch`` as one nftables text buffer: the maps' elements and
    the fence (stale elements and ``phase`` keys, when a mapping changed)."""
    lines: list[str] = []
    for name, keys in fence_ops(batch, "delete"):
        lines.append(f"delete element {_family(name)} {table} {name} {{ {', '.join(keys)} }}")
    for name, items in sorted(batch.adds.items()):
        body = ", ".join(k if v is None else f"{k} : {v}" for k, v in items)
        lines.append(f"add element {_family(name)} {table} {name} {{ {body} }}")
    for name, keys in fence_ops(batch, "add"):
        lines.append(f"add element {_family(name)} {table} {name} {{ {', '.join(keys)} }}")
    return "\n".join(lines) + "\n"


def fence_ops(batch: Batch, op: Literal["add", "delete"]) -> list[tuple[str, list[str]]]:
    """(set, rendered keys) of one operation, in transaction order: the deletes are the
    maps' then the fence's; the adds here are the fence's only (the maps' adds come
    between the two, see :func:`render_batch`)."""
    bits_in: list[tuple[StaleKey, int]] = []
    bits_out: list[tuple[StaleKey, int]] = []
    for key, (old, new) in batch.phase_moves.items():
        for bit in (1, 2):
            if new & bit and not old & bit:
                bits_in.append((key, bit))
            elif old & bit and not new & bit:
                bits_out.append((key, bit))
    if op == "delete":
        return [*sorted(batch.deletes.items()), *_fence_elements(batch.stale_del, bits_out)]
    return _fence_elements(batch.stale_add, bits_in)


def _stale_texts(elem: StaleElem) -> list[str]:
    """A stale element as ``stale`` set keys: ``zone . address . phase`` placed where the
    source side's phase is, and where the destination side's is (one key for phase 0)."""
    (zone, addr), ph = elem
    marks = sorted({ph << PHASE_SHIFT["src"], ph << PHASE_SHIFT["dst"]})
    return [f"{zone} . {addr} . 0x{m:08x}" for m in marks]


def _fence_elements(
    stale: Iterable[StaleElem], phase_bits: Iterable[tuple[StaleKey, int]]
) -> list[tuple[str, list[str]]]:
    """Fence set elements per set, sorted by set name: stale elements in ``stale``, keys
    (``zone . address``) in ``phase_a`` (phase bit 1) and ``phase_b`` (bit 2)."""
    out: dict[str, list[str]] = {}
    for elem in sorted(stale, key=_elem_order):
        out.setdefault("stale6" if elem[0][1].version == 6 else "stale", []).extend(
            _stale_texts(elem))
    for (zone, addr), bit in sorted(phase_bits, key=_elem_order):
        name = ("phase_a" if bit == 1 else "phase_b") + ("6" if addr.version == 6 else "")
        out.setdefault(name, []).append(f"{zone} . {addr}")
    return sorted(out.items())


def fence_lists(
    stale: Iterable[StaleElem], phase: Mapping[StaleKey, int]
) -> dict[str, list[str]]:
    """The fence sets' elements as :func:`render_table` takes them: a rebuild keeps the
    fence, since flows carry their phases across it."""
    bits = [(key, bit) for key, ph in phase.items() for bit in (1, 2) if ph & bit]
    return dict(_fence_elements(stale, bits))


def _family(name: str) -> str:
    """The table family of a map or set: the ip6 table's names end in "6"."""
    return "ip6" if name in _NAMES6 else "ip"


_MAPS = {
    "iif_acct": "type ifname : mark;",
    "iif_zone": "typeof iifname : ct zone;",
    "phys_acct": "type ipv4_addr : mark;",
    "phys_zone": "typeof ip daddr : ct zone;",
    "acct_if": "type mark . ifname;",
    "if_addr": "type ifname . ipv4_addr;",
    "local_logical": "type mark . ipv4_addr;",
    "out_snat": "type mark . ipv4_addr : ipv4_addr;",
    "in_dnat": "type ipv4_addr : ipv4_addr;",
    "out_dnat": "type mark . ipv4_addr : ipv4_addr;",
    "in_snat": "type mark . ipv4_addr : ipv4_addr;",
}
_SETS = {"acct_if", "if_addr", "local_logical"}
# The ip6 table's maps: the same names + "6", IPv6 addresses where the ip ones have IPv4.
_MAPS6 = {name + "6": decl.replace("ipv4_addr", "ipv6_addr").replace("ip daddr", "ip6 daddr")
          for name, decl in _MAPS.items()}
_SETS6 = {name + "6" for name in _SETS}
# The fence's sets (see "Old flows" in dataplane.py), hash sets: keys in phases with bit 1
# (2) set, and stale ``zone . address . phase`` (the phase where a side keeps it).
FENCE_DECLS = {
    "phase_a": "typeof ct zone . ct original {ipx} saddr;",
    "phase_b": "typeof ct zone . ct original {ipx} saddr;",
    "stale": "typeof ct zone . ct original {ipx} saddr . ct mark;",
}
_FENCE = tuple(FENCE_DECLS)
_NAMES6 = {*_MAPS6, *(name + "6" for name in _FENCE)}
# Neighbour discovery is not instance traffic: it must pass untouched (no mark, no NAT,
# no spoofing check on its link-local source) in both directions.
_ND = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }"


def render_table(settings: DataplaneSettings, by_name: Mapping[str, list[str]]) -> str:
    """Both tables (``ip`` and ``ip6``) with their elements (rendered ``key`` or
    ``key : value`` per map/set, see :func:`element_lists` and :func:`fence_lists`),
    replacing any previous ones, as one transaction."""
    parts = _table_text(settings, 4) + _table_text(settings, 6)
    t = settings.table
    for name, items in sorted(by_name.items()):
        # Chunks keep single statements moderate; they are still one transaction.
        for i in range(0, len(items), 20000):
            parts.append(f"add element {_family(name)} {t} {name} "
                         f"{{ {', '.join(items[i:i + 20000])} }}")
    return "\n".join(parts) + "\n"


def _table_text(settings: DataplaneSettings, version: int) -> list[str]:
    """One family's table: the same chains for ``ip`` and ``ip6`` (see the theory of
    operation in ``dataplane.py``), plus neighbour discovery let through for IPv6."""
    t, fab = settings.table, settings.fabric_if
    mask = f"0x{0xFFFF0000:08x}"
    base = f"0x{settings.mark_base:08x}"
    v6 = version == 6
    fam, ipx, f = ("ip6", "ip6", "6") if v6 else ("ip", "ip", "")
    maps, sets = (_MAPS6, _SETS6) if v6 else (_MAPS, _SETS)
    nd = [f"    {_ND} accept"] if v6 else []
    parts = [f"table {fam} {t} {{}}", f"delete table {fam} {t}", f"table {fam} {t} {{"]
    for name, decl in maps.items():
        kind = "set" if name in sets else "map"
        parts.append(f"  {kind} {name} {{ {decl} }}")
    grants = ", ".join(f"tcp . {p}" for p in settings.granted_tcp_ports)
    parts.append(f"  set grants{f} {{ type inet_proto . inet_service; "
                 f"{'elements = { ' + grants + ' }' if grants else ''} }}")
    # The fence of old flows (see dataplane.py): the keys' phases (two bits) and the
    # stale (key, phase) pairs. Hash sets: an interval set (pipapo) cost ~0.15 ms per
    # transaction that touched it.
    for name, decl in FENCE_DECLS.items():
        parts.append(f"  set {name}{f} {{ {decl.format(ipx=ipx)} }}")
    parts += [
        "  chain raw_pre { type filter hook prerouting priority raw; policy accept;",
        *nd,
        f'    iifname "{fab}" meta mark set {ipx} daddr map @phys_acct{f}'
        f" ct zone set {ipx} daddr map @phys_zone{f} return",
        f"    meta mark set iifname map @iif_acct{f} iifname . {ipx} saddr != @if_addr{f} drop",
        # Traffic to the host itself (granted services) stays in zone 0: the host's
        # replies are generated locally and would not find an entry in another zone.
        f"    iifname @iif_acct{f} fib daddr type != local"
        f" ct zone set iifname map @iif_zone{f}",
        "  }",
        "  chain nat_pre { type nat hook prerouting priority dstnat; policy accept;",
        *([f"    {_ND} return"] if v6 else []),
        f'    iifname "{fab}" dnat {ipx} to {ipx} daddr map @in_dnat{f}',
        f"    iifname @iif_acct{f} meta mark . {ipx} daddr @local_logical{f} return",
        f"    iifname @iif_acct{f} dnat {ipx} to meta mark . {ipx} daddr map @out_dnat{f}",
        "  }",
        "  chain nat_post { type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{fab}" snat {ipx} to meta mark . {ipx} saddr map @out_snat{f}',
        f'    iifname "{fab}" snat {ipx} to meta mark . {ipx} saddr map @in_snat{f}',
        "  }",
        "  chain forward_f { type filter hook forward priority filter; policy accept;",
        f"    meta mark & {mask} != {base} return",
        # A new flow takes, per side, the phase its key has now (bit by bit).
        *(f"    ct state new ct zone . ct original {ipx} {d}addr @phase_{ab}{f}"
          f" ct mark set ct mark | 0x{bit << shift:08x}"
          for d, shift in _SIDES for ab, bit in (("a", 1), ("b", 2))),
        # A flow of a stale phase of its source's (destination's) key is dropped.
        *(f"    ct state != new ct zone . ct original {ipx} {d}addr"
          f" . ct mark & 0x{(PHASES - 1) << shift:08x} @stale{f} drop" for d, shift in _SIDES),
        "    ct state established,related accept",
        f'    iifname "{fab}" meta mark . {ipx} saddr @in_snat{f}'
        f" meta mark . oifname @acct_if{f} accept",
        f'    iifname != "{fab}" meta mark . iifname @acct_if{f} meta mark . oifname @acct_if{f}'
        " accept",
        f'    oifname "{fab}" ct status dnat meta mark . iifname @acct_if{f} accept',
        "    drop",
        "  }",
        "  chain input_f { type filter hook input priority filter; policy accept;",
        *nd,
        # The account mark goes into the connection so replies route by it.
        f"    iifname @iif_acct{f} meta l4proto . th dport @grants{f}"
        " ct mark set meta mark accept",
        f"    iifname @iif_acct{f} drop",
        f'    iifname "{fab}" {ipx} daddr @phys_acct{f} drop',
        "  }",
        "  chain route_out { type route hook output priority mangle; policy accept;",
        f"    ct mark & {mask} == {base} meta mark set ct mark",
        "  }",
        "}",
    ]
    return parts


_SIDES = (("s", PHASE_SHIFT["src"]), ("d", PHASE_SHIFT["dst"]))


def element_lists(
    records: Mapping[Key, AppliedRecord], host: str, ids: Mapping[str, int],
    settings: DataplaneSettings,
) -> dict[str, list[str]]:
    """All elements of ``records`` per map/set, rendered (the rebuild's fast path: the
    same elements as :func:`_record_elements`, without a dict per record)."""
    marks = {a: _mark(settings, i) for a, i in ids.items()}
    out: dict[str, list[str]] = {name: [] for name in [*_MAPS, *_MAPS6]}
    # The remote maps hold nearly all elements: their appends are bound once, and IPv4
    # addresses are formatted by inet_ntoa (3x faster than str() of an address).
    out_dnat, in_snat = out["out_dnat"].append, out["in_snat"].append
    for r in records.values():
        m = marks[r.account]
        if r.logical.version == 4:
            lg, ph = inet_ntoa(r.logical.packed), inet_ntoa(r.physical.packed)
            f = ""
            if r.host != host:
                out_dnat(f"{m} . {lg} : {ph}")
                in_snat(f"{m} . {ph} : {lg}")
                continue
        else:
            lg, ph = str(r.logical), str(r.physical)
            f = "6"
            if r.host != host:
                out["out_dnat6"].append(f"{m} . {lg} : {ph}")
                out["in_snat6"].append(f"{m} . {ph} : {lg}")
                continue
        aid = ids[r.account]
        ifn = f'"{instance_ifname(r.account, r.logical)}"'
        out["iif_acct" + f].append(f"{ifn} : {m}")
        out["iif_zone" + f].append(f"{ifn} : {aid}")
        out["phys_acct" + f].append(f"{ph} : {m}")
        out["phys_zone" + f].append(f"{ph} : {aid}")
        out["acct_if" + f].append(f"{m} . {ifn}")
        out["if_addr" + f].append(f"{ifn} . {lg}")
        out["local_logical" + f].append(f"{m} . {lg}")
        out["out_snat" + f].append(f"{m} . {lg} : {ph}")
        out["in_dnat" + f].append(f"{ph} : {lg}")
    return {k: v for k, v in out.items() if v}
