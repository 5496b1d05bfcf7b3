"""The quiesce retires the source's veth (down and renamed over netlink, in-process)
instead of deleting it on the switch's critical path (as root, in a namespace of ours)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from edgevisor.migration.domain_host import delete_link, retire_link
from edgevisor.network import netns as nn

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

NS = f"evtest-retire-{os.getpid()}"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True,
                          text=True).stdout  # fmt: skip


@pytest.fixture
def ns() -> Iterator[None]:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        _ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
        _ip("addr", "add", "10.99.0.1/24", "dev", "va")
        _ip("link", "set", "va", "up")
        _ip("link", "set", "vb", "up")
        _ip("route", "add", "10.99.1.7/32", "dev", "va")
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def _in_ns(fn: Callable[..., bool], *args: str) -> bool:
    """``fn(*args)`` in the test namespace (the helpers act on the calling thread's)."""
    return nn.call_in(NS, lambda: fn(*args))


def test_retire_takes_the_link_down_renames_it_and_drops_its_routes(ns: None) -> None:
    assert _in_ns(retire_link, "va", "vq") is True
    links = _ip("-o", "link", "show")
    assert " va@" not in links and " vq@" in links
    assert "state DOWN" in _ip("-o", "link", "show", "vq")
    assert "10.99.1.7" not in _ip("route", "show")
    # the old name is free for the next copy of the domain
    _ip("link", "add", "va", "type", "veth", "peer", "name", "vc")
    assert _in_ns(delete_link, "vq") is True
    assert " vq@" not in _ip("-o", "link", "show")
    assert " vb@" not in _ip("-o", "link", "show")  # the peer went with it


def test_retire_or_delete_of_a_missing_link_is_false(ns: None) -> None:
    assert _in_ns(retire_link, "nosuch", "vq") is False
    assert _in_ns(delete_link, "nosuch") is False


def test_retire_onto_a_taken_name_fails_and_leaves_the_link(ns: None) -> None:
    with pytest.raises(OSError):
        _in_ns(retire_link, "va", "vb")
    assert " va@" in _ip("-o", "link", "show")
