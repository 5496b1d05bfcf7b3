"""edgevisor: self-hosted edge compute.

The public surface is the SDK and its errors; every other module is private.
"""

from edgevisor._version import __version__
from edgevisor.errors import (
    AlreadyExists,
    ConfigError,
    Conflict,
    EdgevisorError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PeerUnavailable,
    RequestError,
    ResourceExhausted,
    StoreUnavailable,
    TooManyRequests,
    Unauthorized,
    UnavailableError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from edgevisor.sdk.client import AsyncClient, Client


def __getattr__(name: str) -> object:
    # The SDK pulls in httpx; load it on first use so daemons and sandboxes start lean.
    if name in ("Client", "AsyncClient"):
        from edgevisor.sdk import client

        return getattr(client, name)
    raise AttributeError(f"module 'edgevisor' has no attribute {name!r}")

__all__ = [
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
