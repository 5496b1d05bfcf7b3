"""Fixtures for device integration tests: a DeviceService on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from devices_mqtt_helpers import free_port

from edgevisor.devices.service import DeviceService, DevicesSettings

TaskFn = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass
class Harness:
    svc: DeviceService
    port: int
    calls: list[tuple[str, dict[str, Any]]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    started: list[DeviceService] = []

    async def make(
        task: TaskFn | None = None,
        *,
        external_url: str | None = None,
        link: str = "inprocess",
        settings_extra: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Harness:
        calls: list[tuple[str, dict[str, Any]]] = []

        async def call_task(name: str, event: dict[str, Any]) -> Any:
            calls.append((name, event))
            if task is not None:
                return await task(name, event)
            return {"task": name, "got": event["payload"]}

        port = free_port()
        settings = DevicesSettings(
            broker_port=port,
            external_broker_url=external_url,
            spool_retry_interval_s=0.2,
            reconnect_interval_s=0.2,
            agent_link=link,
            **(settings_extra or {}),
        )
        svc = DeviceService(
            settings, tmp_path / f"data{len(started)}", call_task, task_exists=lambda n: True, **kw
        )
        await svc.start()
        started.append(svc)
        return Harness(svc, port, calls)

    try:
        yield make
    finally:
        for svc in started:
            await svc.stop()
