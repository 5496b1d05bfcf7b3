"""The one error hierarchy of edgevisor.

Errors are split by who can act on them: the caller (a request that is wrong and will
stay wrong until changed) or the world (a peer, store or resource that is unavailable
now and may recover). Each class carries the HTTP status and a stable ``code`` so the
API, SDK and CLI agree on them::

    EdgevisorError                      500 internal
    ├── RequestError                    400 invalid_request      (the caller must change it)
    │   ├── ConfigError                 400 invalid_config
    │   ├── Unauthorized                401 unauthorized
    │   ├── Forbidden                   403 forbidden
    │   ├── NotFound                    404 not_found
    │   ├── Conflict                    409 conflict
    │   │   └── AlreadyExists           409 already_exists
    │   └── PayloadTooLarge             413 payload_too_large
    └── UnavailableError                503 unavailable         (the world must change)
        ├── TooManyRequests             429 too_many_requests
        ├── ResourceExhausted           507 resource_exhausted
        ├── StoreUnavailable            503 store_unavailable
        └── PeerUnavailable             503 peer_unavailable

``from_payload`` turns an API error body back into the matching class, so an SDK user
catches the same ``NotFound`` the controller raised.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AlreadyExists",
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
    "from_payload",
]


class EdgevisorError(Exception):
    """Base of every error edgevisor raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class RequestError(EdgevisorError):
    """The request is wrong; repeating it unchanged will fail the same way."""

    status = 400
    code = "invalid_request"


class ConfigError(RequestError):
    """A setting is invalid; the message names the field and the reason."""

    code = "invalid_config"


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class Conflict(RequestError):
    status = 409
    code = "conflict"


class AlreadyExists(Conflict):
    code = "already_exists"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnavailableError(EdgevisorError):
    """Something outside the caller is unavailable now; a retry later may succeed."""

    status = 503
    code = "unavailable"


class TooManyRequests(UnavailableError):
    status = 429
    code = "too_many_requests"

    def __init__(
        self, message: str, *, retry_after_s: float = 1.0, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details={"retry_after_s": retry_after_s, **(details or {})})
        self.retry_after_s = retry_after_s


class ResourceExhausted(UnavailableError):
    """A pool or budget is exhausted (addresses, memory, environments)."""

    status = 507
    code = "resource_exhausted"


class StoreUnavailable(UnavailableError):
    code = "store_unavailable"


class PeerUnavailable(UnavailableError):
    code = "peer_unavailable"


def _all_subclasses(cls: type[EdgevisorError]) -> list[type[EdgevisorError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def from_payload(status: int, payload: Any) -> EdgevisorError:
    """Rebuild an error from an API response body ``{"error": {"code", "message"}}``."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return EdgevisorError(f"HTTP {status}: {payload!r}")
    code = str(err.get("code", ""))
    message = str(err.get("message", ""))
    details = err.get("details") if isinstance(err.get("details"), dict) else None
    for cls in _all_subclasses(EdgevisorError):
        if cls.code == code:
            if cls is TooManyRequests:
                retry = float((details or {}).get("retry_after_s", 1.0))
                return TooManyRequests(message, retry_after_s=retry, details=details)
            try:
                return cls(message, details=details)
            except TypeError:  # a subclass with its own constructor: use its base
                base = next(b for b in cls.__mro__[1:] if issubclass(b, EdgevisorError))
                return base(message, details=details)
    by_status = {c.status: c for c in reversed(_all_subclasses(EdgevisorError))}
    return by_status.get(status, EdgevisorError)(message, details=details)
