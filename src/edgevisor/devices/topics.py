"""MQTT topic names, topic filters and edgevisor's topic scheme (pure).

Matching follows MQTT 3.1.1 section 4.7:

- levels are separated by ``/``; empty levels are legal (``a//b``, ``/a``);
- ``+`` matches exactly one level (including an empty one) and must fill its whole level;
- ``#`` matches the parent level and any number of children and must be the last level;
- a filter starting with a wildcard does not match a topic starting with ``$``
  (``#`` and ``+/x`` do not see ``$SYS/x``) [MQTT-4.7.2-1];
- topic names (what is published) contain no wildcards; names and filters are 1..65535
  UTF-8 bytes without U+0000.

Topic scheme of a device named ``<name>`` (all topics a device owns live under two roots, so
its ACL is two filters; see :mod:`edgevisor.devices.registry`)::

    devices/<name>/#                       the device's own telemetry and commands (pub + sub)
    edgevisor/shadow/<name>/update         device -> agent: {"state": {...}, "version": n}
    edgevisor/shadow/<name>/update/accepted  agent -> device: the new document
    edgevisor/shadow/<name>/update/rejected  agent -> device: {"code", "message", "version"}
    edgevisor/shadow/<name>/get            device -> agent: ask for the document
    edgevisor/shadow/<name>/get/accepted   agent -> device: the document
    edgevisor/shadow/<name>/delta          agent -> device: {"state": delta, "version": n}

Why not ``$edgevisor/...``: amqtt 0.12 closes the connection of a client that PUBLISHes to a
topic starting with ``$``, so a device could never send a shadow update there.
"""

from __future__ import annotations

__all__ = [
    "SHADOW_ROOT",
    "InvalidTopic",
    "device_root",
    "filter_covers",
    "matches",
    "shadow_topic",
    "validate_filter",
    "validate_name",
]

SHADOW_ROOT = "edgevisor/shadow"
_MAX_BYTES = 65535


class InvalidTopic(ValueError):
    """A topic name or filter breaks the MQTT 3.1.1 rules; the message says which."""


def _check_common(text: str, what: str) -> None:
    if not text:
        raise InvalidTopic(f"{what} is empty")
    if "\x00" in text:
        raise InvalidTopic(f"{what} contains U+0000")
    if len(text.encode("utf-8")) > _MAX_BYTES:
        raise InvalidTopic(f"{what} is longer than 65535 bytes")


def validate_name(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name (something one publishes to)."""
    _check_common(topic, "topic name")
    if "+" in topic or "#" in topic:
        raise InvalidTopic(f"topic name {topic!r} contains a wildcard")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid topic filter (something one subscribes to)."""
    _check_common(topic_filter, "topic filter")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise InvalidTopic(f"filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise InvalidTopic(f"filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Whether the (valid) ``topic_filter`` matches the (valid) topic name ``topic``."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True  # '#' also matches the parent: "a/#" matches "a"
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def filter_covers(allowed: str, requested: str) -> bool:
    """Whether every topic ``requested`` can match is also matched by ``allowed``.

    Used for SUBSCRIBE ACLs: a device allowed ``devices/d1/#`` may subscribe to
    ``devices/d1/+/x`` but not to ``devices/+/x`` (that reaches other devices' topics).
    """
    a_levels = allowed.split("/")
    r_levels = requested.split("/")
    if requested[:1] in ("+", "#") and allowed[:1] not in ("+", "#"):
        return False
    for i, a in enumerate(a_levels):
        if a == "#":
            return True
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#":
            return False  # only '#' covers '#'
        if a == "+":
            continue
        if r == "+" or r != a:
            return False
    return len(a_levels) == len(r_levels)


def device_root(name: str) -> str:
    """The filter of a device's own topics."""
    return f"devices/{name}/#"


def shadow_topic(name: str, suffix: str) -> str:
    """``edgevisor/shadow/<name>/<suffix>``, e.g. ``shadow_topic("d1", "delta")``."""
    return f"{SHADOW_ROOT}/{name}/{suffix}"
