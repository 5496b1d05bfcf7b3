"""Routes persisted in the device database (the table itself is pure: :mod:`.routes`)."""

from __future__ import annotations

import json
import sqlite3

from edgevisor.devices.routes import Route, RouteError, RouteTable

__all__ = ["RouteStore"]


class RouteStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS routes (name TEXT PRIMARY KEY, spec TEXT NOT NULL)"
        )

    def load(self) -> RouteTable:
        table = RouteTable()
        for name, spec in self._conn.execute("SELECT name, spec FROM routes ORDER BY name"):
            try:
                table.routes[name] = Route.from_json(json.loads(spec))
            except (RouteError, ValueError) as exc:
                raise RouteError(f"stored route {name!r} is invalid: {exc}") from exc
        return table

    def save(self, route: Route) -> None:
        self._conn.execute(
            "INSERT INTO routes (name, spec) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
            (route.name, json.dumps(route.to_json())),
        )

    def delete(self, name: str) -> None:
        self._conn.execute("DELETE FROM routes WHERE name = ?", (name,))
