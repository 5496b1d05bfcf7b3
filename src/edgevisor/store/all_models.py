"""Imports every module that defines tables, so ``Base.metadata`` is complete."""

from edgevisor.store import models, task_models

__all__ = ["models", "task_models"]
