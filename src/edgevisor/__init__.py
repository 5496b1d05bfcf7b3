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
from edgevisor.sdk.client import AsyncClient, Client

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
