"""Shadow documents: patches, deltas, optimistic concurrency, the controller-sync rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevisor.devices.db import open_db
from edgevisor.devices.shadows import (
    Shadow,
    ShadowConflict,
    ShadowStore,
    apply_update,
    compute_delta,
    merge_patch,
    parse_update,
    reconcile,
)
from edgevisor.errors import Conflict, RequestError


def test_devices_merge_patch_recursive_and_null_deletes() -> None:
    base = {"a": 1, "b": {"x": 1, "y": 2}, "c": 3}
    out = merge_patch(base, {"b": {"y": None, "z": 3}, "c": None, "d": {"k": None, "v": 1}})
    assert out == {"a": 1, "b": {"x": 1, "z": 3}, "d": {"v": 1}}
    assert base == {"a": 1, "b": {"x": 1, "y": 2}, "c": 3}  # untouched


@pytest.mark.parametrize(
    ("desired", "reported", "delta"),
    [
        ({"led": "on"}, {"led": "off"}, {"led": "on"}),
        ({"led": "on"}, {"led": "on"}, {}),
        ({"led": "on"}, {}, {"led": "on"}),
        ({}, {"led": "on"}, {}),  # reported-only keys are not in the delta
        ({"cfg": {"a": 1, "b": 2}}, {"cfg": {"a": 1, "b": 3}}, {"cfg": {"b": 2}}),
        ({"cfg": {"a": 1}}, {"cfg": {"a": 1, "extra": 0}}, {}),
        ({"cfg": {"a": 1}}, {"cfg": 5}, {"cfg": {"a": 1}}),
        ({"on": True}, {"on": 1}, {"on": True}),  # JSON true != 1
        ({"t": 1}, {"t": 1.0}, {}),  # 1 and 1.0 are the same JSON number
        ({"l": [1, 2]}, {"l": [1, 2]}, {}),
    ],
)
def test_devices_compute_delta(
    desired: dict[str, object], reported: dict[str, object], delta: dict[str, object]
) -> None:
    assert compute_delta(desired, reported) == delta


def test_devices_apply_update_versions_and_timestamps() -> None:
    s0 = Shadow("d1")
    s1 = apply_update(s0, desired={"led": "on"}, reported=None, expected_version=None, now=10.0)
    assert (s1.version, s1.created_at, s1.desired_updated_at, s1.reported_updated_at) == (
        1,
        10.0,
        10.0,
        0.0,
    )
    assert s1.delta == {"led": "on"}
    s2 = apply_update(s1, desired=None, reported={"led": "on"}, expected_version=1, now=11.0)
    assert s2.version == 2 and s2.delta == {} and s2.created_at == 10.0
    assert s2.reported_updated_at == 11.0 and s2.desired_updated_at == 10.0


def test_devices_stale_version_is_a_typed_conflict_with_current_version() -> None:
    s = apply_update(Shadow("d1"), desired={"a": 1}, reported=None, expected_version=0, now=1)
    with pytest.raises(ShadowConflict) as info:
        apply_update(s, desired={"a": 2}, reported=None, expected_version=0, now=2)
    assert isinstance(info.value, Conflict)
    assert info.value.current_version == 1
    assert info.value.to_payload()["error"]["details"]["version"] == 1


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"state": 1},
        {"state": {"desired": 1}},
        {"state": {"delta": {}}},
        {"state": {}, "version": "3"},
        {"state": {}, "version": True},
    ],
)
def test_devices_parse_update_rejects(body: object) -> None:
    with pytest.raises(RequestError):
        parse_update(body)


def test_devices_parse_update_ok() -> None:
    assert parse_update({"state": {"desired": {"a": 1}}, "version": 4}) == ({"a": 1}, None, 4)


def _s(version: int, desired: dict[str, object], at: float, reported: object = None) -> Shadow:
    return Shadow(
        "d1",
        version=version,
        desired=desired,
        reported=dict(reported or {}),  # type: ignore[call-overload]
        desired_updated_at=at,
    )


def test_devices_reconcile_newest_desired_wins() -> None:
    local = _s(3, {"led": "off"}, 5.0, {"led": "off"})
    remote = _s(5, {"led": "on"}, 4.0, {"led": "stale"})
    out = reconcile(local, remote)
    assert out.desired == {"led": "on"}
    assert out.reported == {"led": "off"}  # reported is always the agent's
    assert out.version == 6


def test_devices_reconcile_local_newer_keeps_local() -> None:
    local = _s(7, {"led": "off"}, 5.0)
    remote = _s(5, {"led": "on"}, 9.0)
    out = reconcile(local, remote)
    assert out.desired == {"led": "off"} and out.version == 7


def test_devices_reconcile_tie_breaks_on_time_then_local() -> None:
    assert reconcile(_s(4, {"a": 1}, 1.0), _s(4, {"a": 2}, 2.0)).desired == {"a": 2}
    assert reconcile(_s(4, {"a": 1}, 2.0), _s(4, {"a": 2}, 1.0)).desired == {"a": 1}
    assert reconcile(_s(4, {"a": 1}, 2.0), _s(4, {"a": 2}, 2.0)).desired == {"a": 1}


def test_devices_shadow_store_persists_and_compare_and_sets(tmp_path: Path) -> None:
    path = tmp_path / "devices.db"
    store = ShadowStore(open_db(path))
    assert store.get("d1").version == 0
    s1 = store.update("d1", desired={"led": "on"}, now=1.0)
    with pytest.raises(ShadowConflict) as info:
        store.update("d1", desired={"led": "off"}, expected_version=0, now=2.0)
    assert info.value.current_version == 1
    # A writer that read version 0 and lost the race is refused by put() too.
    stale = apply_update(Shadow("d1"), desired={"x": 1}, reported=None, expected_version=0, now=3)
    with pytest.raises(ShadowConflict):
        store.put(stale, previous_version=0)
    reopened = ShadowStore(open_db(path))
    assert reopened.get("d1") == s1
    assert reopened.get("d1").to_json()["state"]["delta"] == {"led": "on"}
