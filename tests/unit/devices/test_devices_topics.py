"""MQTT 3.1.1 topic rules (section 4.7) as implemented by edgevisor.devices.topics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgevisor.devices.topics import (
    InvalidTopic,
    filter_covers,
    matches,
    validate_filter,
    validate_name,
)


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/+", "a/", True),  # '+' matches an empty level
        ("+/+", "/x", True),  # leading empty level
        ("+", "/x", False),
        ("a/#", "a", True),  # '#' matches the parent level too
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "a/b", True),
        ("#", "/", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a//b", "a//b", True),
        ("a/b", "a/b/", False),
        ("A/b", "a/b", False),  # case-sensitive
        # $-topics are not matched by filters starting with a wildcard [MQTT-4.7.2-1]
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$SYS/+", "$SYS/x", True),
    ],
)
def test_devices_matches(flt: str, topic: str, expected: bool) -> None:
    assert matches(flt, topic) is expected


@pytest.mark.parametrize("bad", ["a/#/b", "a#", "a/b#", "a+/b", "+a", "", "a\x00b", "##"])
def test_devices_invalid_filters(bad: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_filter(bad)


@pytest.mark.parametrize("good", ["#", "+", "a/#", "+/+/#", "/", "a//b", "$SYS/#"])
def test_devices_valid_filters(good: str) -> None:
    assert validate_filter(good) == good


@pytest.mark.parametrize("bad", ["a/+", "a/#", "", "x\x00", "a" * 65536])
def test_devices_invalid_names(bad: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_name(bad)


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("devices/d1/#", "devices/d1/#", True),
        ("devices/d1/#", "devices/d1/+/x", True),
        ("devices/d1/#", "devices/d1", True),
        ("devices/d1/#", "devices/+/x", False),
        ("devices/d1/#", "devices/#", False),
        ("devices/d1/#", "#", False),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/+", "a/#", False),
        ("a/b", "a/+", False),
        ("#", "$SYS/x", True),
        ("a/#", "+/x", False),
    ],
)
def test_devices_filter_covers(allowed: str, requested: str, expected: bool) -> None:
    assert filter_covers(allowed, requested) is expected


_level = st.sampled_from(["a", "b", "", "c"])
_topic = st.lists(_level, min_size=1, max_size=4).map("/".join)
_flevel = st.sampled_from(["a", "b", "", "+"])


@st.composite
def _filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(_flevel, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@given(_filters(), _filters(), _topic)
def test_devices_covers_is_sound(allowed: str, requested: str, topic: str) -> None:
    """If allowed covers requested, every topic requested matches is matched by allowed."""
    if filter_covers(allowed, requested) and matches(requested, topic):
        assert matches(allowed, topic)
