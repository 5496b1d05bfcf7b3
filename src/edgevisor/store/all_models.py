"""Imports every module that defines tables, so ``Base.metadata`` is complete."""

from edgevisor.store import (
    device_models,  # noqa: F401
    domain_models,  # noqa: F401
    migration_models,  # noqa: F401
    models,
    network_models,
    task_models,
    volume_models,
)

__all__ = ["models", "network_models", "task_models", "volume_models"]
