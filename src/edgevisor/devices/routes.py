"""Routes: the event-flow table, as a pure decision core (no I/O).

A route is *criteria* and one *destination*:

- criteria: an MQTT topic filter (``+``/``#``, see :mod:`edgevisor.devices.topics`), an
  optional source (a device name or a task name) and an optional ``where`` clause on the
  JSON payload;
- destination: a task call (:class:`ToTask`, optionally publishing the result to a reply
  topic), an MQTT topic (:class:`ToTopic`), a device shadow (:class:`ToShadow`) or the
  controller (:class:`ToController`).

``RouteTable.match(message)`` returns the actions to perform, in route-name order; the
caller (the device service) performs them.

Sources. MQTT 3.1.1 does not tell subscribers who published, so a message's source device is
read from the topic: ``devices/<name>/...`` comes from ``<name>`` (the broker ACL lets only
``<name>`` publish there). A message on a topic outside every device root has no known
source; a route naming ``source_device`` still matches it, because the only devices able to
publish there are those a route grants (see :func:`grants`). Messages made by the agent from
a task's result carry ``source_task``; routes with ``source_task`` match only those.

``where`` is a small JSON field match, all clauses must hold::

    {"temp": {"gt": 30}}                 operators: eq ne gt ge lt le in exists
    {"status": "on"}                     a bare value means eq
    {"sensor.kind": {"in": ["a", "b"]}}  dotted paths walk into nested objects

A missing field fails every operator but ``{"exists": false}``; comparing values of
different types (``"a" > 1``) fails instead of raising.

JSON. A route to a task, a shadow or the controller, and any route with ``where``, needs the
payload to be a JSON value (objects for shadows). A message on a routed topic that is not
valid JSON produces no call: it yields one :class:`DeadLetter` (with the reason) instead of
all the actions that needed JSON; routes that pass raw bytes (:class:`ToTopic` without
``where``) still fire.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgevisor.devices.topics import (
    InvalidTopic,
    filter_covers,
    matches,
    validate_filter,
    validate_name,
)

__all__ = [
    "Action",
    "CallTask",
    "DeadLetter",
    "Destination",
    "Forward",
    "Message",
    "Publish",
    "Route",
    "RouteError",
    "RouteTable",
    "ShadowUpdate",
    "ToController",
    "ToShadow",
    "ToTask",
    "ToTopic",
    "grants",
    "source_device_of",
    "validate_route",
]

_OPS = frozenset({"eq", "ne", "gt", "ge", "lt", "le", "in", "exists"})


class RouteError(ValueError):
    """A route definition is invalid; the message names the field."""


# --- messages and destinations ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    source_task: str | None = None  # set on messages the agent builds from a task's result

    @property
    def source_device(self) -> str | None:
        return source_device_of(self.topic)


def source_device_of(topic: str) -> str | None:
    """``devices/<name>/...`` → ``<name>``; anything else → None."""
    parts = topic.split("/", 2)
    if len(parts) >= 3 and parts[0] == "devices" and parts[1]:
        return parts[1]
    return None


@dataclass(frozen=True, slots=True)
class ToTask:
    task: str
    reply_topic: str | None = None


@dataclass(frozen=True, slots=True)
class ToTopic:
    topic: str


@dataclass(frozen=True, slots=True)
class ToShadow:
    """The payload (a JSON object) is merged into ``section`` of the device's shadow."""

    device: str
    section: str = "desired"


@dataclass(frozen=True, slots=True)
class ToController:
    pass


Destination = ToTask | ToTopic | ToShadow | ToController


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    topic_filter: str
    destination: Destination
    source_device: str | None = None
    source_task: str | None = None
    where: Mapping[str, Any] | None = None

    def needs_json(self) -> bool:
        return self.where is not None or not isinstance(self.destination, ToTopic)

    def to_json(self) -> dict[str, Any]:
        d = self.destination
        dest: dict[str, Any]
        if isinstance(d, ToTask):
            dest = {"kind": "task", "task": d.task, "reply_topic": d.reply_topic}
        elif isinstance(d, ToTopic):
            dest = {"kind": "topic", "topic": d.topic}
        elif isinstance(d, ToShadow):
            dest = {"kind": "shadow", "device": d.device, "section": d.section}
        else:
            dest = {"kind": "controller"}
        return {
            "name": self.name,
            "topic_filter": self.topic_filter,
            "source_device": self.source_device,
            "source_task": self.source_task,
            "where": dict(self.where) if self.where is not None else None,
            "destination": dest,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Route:
        try:
            d = obj["destination"]
            kind = d["kind"]
            dest: Destination
            if kind == "task":
                dest = ToTask(str(d["task"]), d.get("reply_topic"))
            elif kind == "topic":
                dest = ToTopic(str(d["topic"]))
            elif kind == "shadow":
                dest = ToShadow(str(d["device"]), str(d.get("section", "desired")))
            elif kind == "controller":
                dest = ToController()
            else:
                raise RouteError(f"destination.kind: unknown kind {kind!r}")
            route = cls(
                name=str(obj["name"]),
                topic_filter=str(obj["topic_filter"]),
                destination=dest,
                source_device=obj.get("source_device"),
                source_task=obj.get("source_task"),
                where=obj.get("where"),
            )
        except (KeyError, TypeError) as exc:
            raise RouteError(f"malformed route: {exc!r}") from exc
        validate_route(route)
        return route


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallTask:
    route: str
    task: str
    event: dict[str, Any]
    reply_topic: str | None


@dataclass(frozen=True, slots=True)
class Publish:
    route: str
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class ShadowUpdate:
    route: str
    device: str
    section: str
    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Forward:
    """Send to the controller (through the spool)."""

    route: str
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    reason: str
    routes: tuple[str, ...]
    payload: bytes

    def to_payload(self) -> bytes:
        return json.dumps(
            {
                "topic": self.topic,
                "reason": self.reason,
                "routes": list(self.routes),
                "payload": self.payload.decode("utf-8", errors="replace"),
            }
        ).encode()


Action = CallTask | Publish | ShadowUpdate | Forward | DeadLetter


# --- validation ----------------------------------------------------------------------------


def _validate_where(where: Mapping[str, Any]) -> None:
    if not isinstance(where, Mapping):
        raise RouteError("where: must be an object")
    for path, cond in where.items():
        if not isinstance(path, str) or not path:
            raise RouteError("where: field paths must be non-empty strings")
        if isinstance(cond, Mapping):
            if not cond:
                raise RouteError(f"where.{path}: empty condition")
            for op, val in cond.items():
                if op not in _OPS:
                    raise RouteError(f"where.{path}: unknown operator {op!r}")
                if op == "in" and not isinstance(val, list):
                    raise RouteError(f"where.{path}.in: must be a list")
                if op == "exists" and not isinstance(val, bool):
                    raise RouteError(f"where.{path}.exists: must be true or false")


def validate_route(
    route: Route, task_exists: Callable[[str], bool] | None = None
) -> Route:
    """Check a route; ``task_exists`` rejects a route to a task that is not deployed."""
    if not route.name:
        raise RouteError("name: must not be empty")
    try:
        validate_filter(route.topic_filter)
    except InvalidTopic as exc:
        raise RouteError(f"topic_filter: {exc}") from exc
    if route.source_device is not None and route.source_task is not None:
        raise RouteError("source_device and source_task are exclusive")
    if route.where is not None:
        _validate_where(route.where)
    d = route.destination
    reply: str | None = None
    if isinstance(d, ToTask):
        if task_exists is not None and not task_exists(d.task):
            raise RouteError(f"destination.task: no task named {d.task!r}")
        reply = d.reply_topic
    elif isinstance(d, ToTopic):
        reply = d.topic
    elif isinstance(d, ToShadow) and d.section not in ("desired", "reported"):
        raise RouteError("destination.section: must be desired or reported")
    if reply is not None:
        try:
            validate_name(reply)
        except InvalidTopic as exc:
            raise RouteError(f"destination topic: {exc}") from exc
        # MQTT 3.1.1 does not tell the agent that a message is its own; a route that
        # matches its own output would loop forever.
        if route.source_task is None and matches(route.topic_filter, reply):
            raise RouteError(f"destination topic {reply!r} matches the route's own filter")
    return route


# --- where ---------------------------------------------------------------------------------

_MISSING = object()


def _lookup(doc: Any, path: str) -> Any:
    node = doc
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _cmp(op: str, left: Any, right: Any) -> bool:
    try:
        if op == "gt":
            return bool(left > right)
        if op == "ge":
            return bool(left >= right)
        if op == "lt":
            return bool(left < right)
        return bool(left <= right)
    except TypeError:
        return False


def _holds(doc: Any, where: Mapping[str, Any]) -> bool:
    for path, cond in where.items():
        value = _lookup(doc, path)
        conds = cond if isinstance(cond, Mapping) else {"eq": cond}
        for op, arg in conds.items():
            if op == "exists":
                if (value is not _MISSING) != arg:
                    return False
                continue
            if value is _MISSING:
                return False
            # bool is an int in Python; {"on": {"eq": 1}} must not match true.
            if op == "eq":
                ok = value == arg and isinstance(value, bool) == isinstance(arg, bool)
            elif op == "ne":
                ok = value != arg or isinstance(value, bool) != isinstance(arg, bool)
            elif op == "in":
                ok = any(
                    value == a and isinstance(value, bool) == isinstance(a, bool) for a in arg
                )
            else:
                ok = not isinstance(value, bool) and _cmp(op, value, arg)
            if not ok:
                return False
    return True


# --- the table -----------------------------------------------------------------------------


def _parse(payload: bytes) -> tuple[Any, str | None]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"payload is not UTF-8: {exc.reason} at byte {exc.start}"
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return None, f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:
        return None, f"payload is not JSON: {exc}"
    return value, None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


# One decoder for every message: ``json.loads`` with an option builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass
class RouteTable:
    """The routes of one agent; ``match`` is pure and does no I/O."""

    routes: dict[str, Route] = field(default_factory=dict)

    def add(self, route: Route, task_exists: Callable[[str], bool] | None = None) -> None:
        validate_route(route, task_exists)
        self.routes[route.name] = route

    def remove(self, name: str) -> bool:
        return self.routes.pop(name, None) is not None

    def filters(self) -> set[str]:
        """The topic filters the agent must subscribe to (device-sourced routes only)."""
        return {r.topic_filter for r in self.routes.values() if r.source_task is None}

    def match(self, message: Message) -> list[Action]:
        candidates = [r for _, r in sorted(self.routes.items()) if self._selects(r, message)]
        if not candidates:
            return []
        doc: Any = None
        error: str | None = None
        if any(r.needs_json() for r in candidates):
            doc, error = _parse(message.payload)
        actions: list[Action] = []
        skipped: list[str] = []
        for route in candidates:
            if route.needs_json() and error is not None:
                skipped.append(route.name)
                continue
            if route.where is not None and not _holds(doc, route.where):
                continue
            action = self._act(route, message, doc)
            if isinstance(action, DeadLetter):
                skipped.append(route.name)
            else:
                actions.append(action)
        if skipped:
            reason = error or "payload is not a JSON object (shadow updates need one)"
            actions.append(DeadLetter(message.topic, reason, tuple(skipped), message.payload))
        return actions

    @staticmethod
    def _selects(route: Route, message: Message) -> bool:
        if route.source_task is not None or message.source_task is not None:
            if route.source_task != message.source_task:
                return False
        elif route.source_device is not None:
            src = message.source_device
            if src is not None and src != route.source_device:
                return False
        return matches(route.topic_filter, message.topic)

    @staticmethod
    def _act(route: Route, message: Message, doc: Any) -> Action:
        d = route.destination
        if isinstance(d, ToTask):
            event = {"topic": message.topic, "source": message.source_device, "payload": doc}
            return CallTask(route.name, d.task, event, d.reply_topic)
        if isinstance(d, ToTopic):
            return Publish(route.name, d.topic, message.payload)
        if isinstance(d, ToShadow):
            if not isinstance(doc, dict):
                return DeadLetter(message.topic, "", (route.name,), message.payload)
            return ShadowUpdate(route.name, d.device, d.section, doc)
        record = {"topic": message.topic, "source": message.source_device, "payload": doc}
        if message.source_task is not None:
            record["task"] = message.source_task
        return Forward(route.name, record)


def grants(routes: Iterable[Route], device: str) -> tuple[list[str], list[str]]:
    """Extra ``(publish filters, subscribe filters)`` that routes grant ``device``.

    A route naming the device as its source lets it publish on the route's filter, and
    subscribe to the route's reply topic (or destination topic) so it can read the answer.
    Filters already inside the device's own root add nothing.
    """
    own = f"devices/{device}/#"
    pub: list[str] = []
    sub: list[str] = []
    for r in routes:
        if r.source_device != device:
            continue
        if not filter_covers(own, r.topic_filter):
            pub.append(r.topic_filter)
        d = r.destination
        out: str | None = None
        if isinstance(d, ToTask):
            out = d.reply_topic
        elif isinstance(d, ToTopic):
            out = d.topic
        if out is not None and not matches(own, out):
            sub.append(out)
    return sorted(set(pub)), sorted(set(sub))
