"""The HTTP API end to end through the SDK: auth, scoping, errors, hosts, events."""

from __future__ import annotations

import time

import httpx
import pytest

from edgevisor import (
    AlreadyExists,
    Client,
    Forbidden,
    NotFound,
    RequestError,
    Unauthorized,
)
from edgevisor.testing.controller import RunningController


def test_health_needs_no_token_everything_else_does(ctl: RunningController) -> None:
    assert httpx.get(ctl.url + "/healthz").json()["status"] == "ok"
    for path in ("/v1/whoami", "/v1/accounts", "/v1/hosts", "/v1/openapi.json", "/v1/events"):
        r = httpx.get(ctl.url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(ctl.url + "/v1/whoami", headers={"authorization": "Bearer evt_nope"})
    assert r.status_code == 401
    assert "not valid" in r.json()["error"]["message"]


def test_openapi_is_published(ctl: RunningController) -> None:
    r = httpx.get(
        ctl.url + "/v1/openapi.json", headers={"authorization": f"Bearer {ctl.admin_token}"}
    )
    assert r.status_code == 200
    assert "/v1/hosts" in r.json()["paths"]


def test_unknown_route_is_json_404(ctl: RunningController) -> None:
    r = httpx.get(ctl.url + "/v1/nope", headers={"authorization": f"Bearer {ctl.admin_token}"})
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "not_found", "message": "no such route"}}


def test_malformed_json_is_400_with_position(ctl: RunningController) -> None:
    r = httpx.post(
        ctl.url + "/v1/accounts",
        content=b'{"name": ',
        headers={"authorization": f"Bearer {ctl.admin_token}", "content-type": "application/json"},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert "position 9" in err["message"]


def test_oversize_body_is_413(ctl: RunningController) -> None:
    big = b'{"name": "' + b"a" * 10_000 + b'"}'
    r = httpx.post(
        ctl.url + "/v1/accounts",
        content=big,
        headers={"authorization": f"Bearer {ctl.admin_token}", "content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no content-length: the limit holds while streaming too
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(
        ctl.url + "/v1/accounts",
        content=chunks(),
        headers={"authorization": f"Bearer {ctl.admin_token}", "content-type": "application/json"},
    )
    assert r.status_code == 413


def test_invalid_field_names_it(admin: Client) -> None:
    with pytest.raises(RequestError, match="name"):
        admin.create_account("Not Valid!")


def test_accounts_and_tokens_are_scoped(ctl: RunningController, admin: Client) -> None:
    admin.create_account("acme")
    admin.create_account("globex")
    with pytest.raises(AlreadyExists):
        admin.create_account("acme")
    acme_secret = admin.create_token("acme", "ci").secret
    with Client(ctl.url, acme_secret) as acme:
        me = acme.whoami()
        assert (me.kind, me.account) == ("account", "acme")
        assert [a.name for a in acme.list_accounts()] == ["acme"]
        assert acme.get_account("acme").name == "acme"
        with pytest.raises(NotFound):  # another account's object: 404, not 403
            acme.get_account("globex")
        with pytest.raises(NotFound):
            acme.create_token("globex")
        with pytest.raises(Forbidden):
            acme.create_account("evil")
        own = acme.create_token(name="second")
        assert own.account == "acme"
        assert {t.account for t in acme.list_tokens()} == {"acme"}
        acme.revoke_token(own.id)
        with Client(ctl.url, own.secret) as revoked, pytest.raises(Unauthorized):
            revoked.whoami()
    assert {a.name for a in admin.list_accounts()} == {"acme", "globex"}
    admin.delete_account("globex")
    with pytest.raises(NotFound):
        admin.get_account("globex")


def _join(ctl: RunningController, secret: str, name: str) -> httpx.Response:
    cap = {"cpu_count": 2, "memory_mb": 1024, "disk_mb": 2048}
    return httpx.post(
        ctl.url + "/v1/hosts/join",
        json={"name": name, "join_token": secret, "capacity": cap, "physical_address": "10.9.0.1"},
    )


def _beat(ctl: RunningController, name: str, credential: str) -> httpx.Response:
    cap = {"cpu_count": 2, "memory_mb": 1024, "disk_mb": 2048}
    return httpx.post(
        f"{ctl.url}/v1/hosts/{name}/heartbeat",
        json={"capacity": cap},
        headers={"authorization": f"Bearer {credential}"},
    )


def _wait(pred, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_host_join_heartbeat_down_and_up(ctl: RunningController, admin: Client) -> None:
    jt = admin.create_join_token(host="h1")
    assert _join(ctl, "evj_wrong", "h1").status_code == 401
    assert _join(ctl, jt.secret, "h2").status_code == 401  # token is for h1 only
    r = _join(ctl, jt.secret, "h1")
    assert r.status_code == 201, r.text
    cred = r.json()["credential"]
    again = _join(ctl, jt.secret, "h1")
    assert again.status_code == 401
    assert "already used" in again.json()["error"]["message"]

    host = admin.get_host("h1")
    assert (host.state, host.cpu_count, host.memory_mb, host.physical_address) == (
        "up",
        2,
        1024,
        "10.9.0.1",
    )
    assert _beat(ctl, "h1", "evh_wrong").status_code == 401
    # No heartbeats: the reconciler marks the host down after the 1 s timeout.
    _wait(lambda: admin.get_host("h1").state == "down")
    assert _beat(ctl, "h1", cred).status_code == 200
    assert admin.get_host("h1").state == "up"
    kinds = [e.kind for e in admin.recent_events() if e.subject == "h1"]
    assert kinds == ["host.joined", "host.down", "host.up"]


def test_event_stream_replays_and_follows(ctl: RunningController, admin: Client) -> None:
    admin.create_account("first")
    seen: list[str] = []
    stream = admin.events(after=0)
    for ev in stream:
        seen.append(ev.kind)
        if ev.kind == "account.created" and ev.subject == "first":
            admin.create_account("second")
        if ev.subject == "second":
            break
    stream.close()
    assert seen[-2:] == ["account.created", "account.created"]


def test_account_token_sees_only_its_events(ctl: RunningController, admin: Client) -> None:
    admin.create_account("a1")
    admin.create_account("a2")
    secret = admin.create_token("a1").secret
    with Client(ctl.url, secret) as a1:
        subjects = {e.subject for e in a1.recent_events()}
    assert "a1" in subjects
    assert "a2" not in subjects
