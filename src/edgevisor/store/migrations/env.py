"""Alembic environment: runs on the engine handed in by :mod:`edgevisor.store.engine`."""

from __future__ import annotations

from alembic import context

import edgevisor.store.all_models  # noqa: F401  (registers every table on Base.metadata)
from edgevisor.store.base import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
