import pytest

import edgevisor
from edgevisor import errors
from edgevisor.control.reconciler import decide_down

ALL = [
    errors.RequestError,
    errors.ConfigError,
    errors.Unauthorized,
    errors.Forbidden,
    errors.NotFound,
    errors.Conflict,
    errors.AlreadyExists,
    errors.PayloadTooLarge,
    errors.UnavailableError,
    errors.TooManyRequests,
    errors.ResourceExhausted,
    errors.StoreUnavailable,
    errors.PeerUnavailable,
]


@pytest.mark.parametrize("cls", ALL)
def test_error_round_trips_through_payload(cls: type[errors.EdgevisorError]) -> None:
    exc = cls("what and why")
    back = errors.from_payload(cls.status, exc.to_payload())
    assert type(back) is cls
    assert back.message == "what and why"


def test_too_many_requests_keeps_retry_after() -> None:
    exc = errors.TooManyRequests("queue full", retry_after_s=7)
    back = errors.from_payload(429, exc.to_payload())
    assert isinstance(back, errors.TooManyRequests)
    assert back.retry_after_s == 7


def test_unknown_code_falls_back_to_status() -> None:
    back = errors.from_payload(404, {"error": {"code": "weird", "message": "m"}})
    assert isinstance(back, errors.NotFound)
    assert isinstance(errors.from_payload(500, "not json"), errors.EdgevisorError)


def test_public_names_are_pinned() -> None:
    assert sorted(edgevisor.__all__) == [
        "AlreadyExists",
        "AsyncClient",
        "Client",
        "ConfigError",
        "Conflict",
        "EdgevisorError",
        "Forbidden",
        "NotFound",
        "PayloadTooLarge",
        "PeerUnavailable",
        "RequestError",
        "ResourceExhausted",
        "StoreUnavailable",
        "TooManyRequests",
        "Unauthorized",
        "UnavailableError",
        "__version__",
    ]
    for name in edgevisor.__all__:
        assert hasattr(edgevisor, name)


def test_liveness_decision() -> None:
    hosts = [("a", "up", 100.0), ("b", "up", 95.0), ("c", "down", 0.0), ("d", "up", 89.9)]
    assert decide_down(hosts, now=100.0, timeout_s=10.0) == ["d"]
    assert decide_down(hosts, now=100.0, timeout_s=4.0) == ["b", "d"]
