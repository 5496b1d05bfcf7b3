"""The agent's MQTT client (amqtt's asyncio client), for the embedded or an external broker.

With the embedded broker the agent connects as :data:`~edgevisor.devices.broker.AGENT_USERNAME`
with the broker's in-memory password. With an external broker (mosquitto, EMQX) given by
URL (``mqtt://user:pass@host:1883``) the agent is just one more client: the device
credentials and ACLs are then the external broker's business — edgevisor neither sees nor
enforces them; :meth:`~edgevisor.devices.registry.DeviceRegistry.acl_lines` renders the ACLs
edgevisor would apply in mosquitto's ``acl_file`` syntax, and the agent's own user there
needs read on every routed filter and ``edgevisor/shadow/+/update|get``, and write on reply,
delta and dead-letter topics.

Third-party errors are converted at this boundary to
:class:`~edgevisor.errors.PeerUnavailable` (broker unreachable, connection lost) and
:class:`~edgevisor.errors.Unauthorized` (credentials refused).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from amqtt.client import MQTTClient
from amqtt.errors import AMQTTError, ClientError, ConnectError

from edgevisor.errors import PeerUnavailable, Unauthorized

__all__ = ["ClientTLS", "MqttClient", "ReceivedMessage", "with_credentials"]

log = logging.getLogger(__name__)

_NOT_AUTHORIZED = (4, 5)  # CONNACK: bad user name or password, not authorized


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS material for an ``mqtts://`` broker: CA bundle and an optional client cert."""

    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    topic: str
    payload: bytes


def with_credentials(url: str, username: str, password: str) -> str:
    """``mqtt://host:port`` → ``mqtt://user:pass@host:port`` (quoted)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme or "mqtt", netloc, parts.path, "", ""))


class MqttClient:
    """One connection; ``messages()`` yields what the subscriptions deliver."""

    def __init__(
        self, client_id: str, *, keep_alive_s: int = 30, tls: ClientTLS | None = None
    ) -> None:
        config: dict[str, Any] = {
            "keep_alive": keep_alive_s,
            "auto_reconnect": False,
            "default_qos": 0,
            "cleansession": True,
        }
        if tls is not None:
            # Used by amqtt only for an ``mqtts://`` URL: the broker is verified against
            # ``cafile`` (system CAs when empty) and the certificate, if any, is presented.
            conn: dict[str, Any] = {}
            if tls.cafile is not None:
                conn["cafile"] = str(tls.cafile)
            if tls.certfile is not None and tls.keyfile is not None:
                conn["certfile"] = str(tls.certfile)
                conn["keyfile"] = str(tls.keyfile)
            config["connection"] = conn
        self._client = MQTTClient(client_id=client_id, config=config)
        self._tls = tls
        self._connected = False

    async def connect(self, url: str, *, timeout_s: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                cafile = None
                if self._tls is not None and self._tls.cafile is not None:
                    cafile = str(self._tls.cafile)
                await self._client.connect(url, cafile=cafile)
        except ConnectError as exc:
            code = getattr(exc, "return_code", None)
            if code in _NOT_AUTHORIZED:
                raise Unauthorized(f"MQTT broker refused the credentials (code {code})") from exc
            raise PeerUnavailable(f"cannot connect to MQTT broker: {exc}") from exc
        except ssl.SSLError as exc:
            raise PeerUnavailable(f"TLS with the MQTT broker failed: {exc}") from exc
        except (TimeoutError, OSError, AMQTTError) as exc:
            raise PeerUnavailable(f"cannot connect to MQTT broker: {exc!r}") from exc
        self._connected = True

    async def subscribe(self, filters: Iterable[str], qos: int = 0) -> None:
        topics = [(f, qos) for f in filters]
        if not topics:
            return
        try:
            codes = await self._client.subscribe(topics)
        except (AMQTTError, OSError) as exc:
            raise PeerUnavailable(f"MQTT subscribe failed: {exc!r}") from exc
        refused = [f for (f, _), c in zip(topics, codes, strict=False) if c == 0x80]
        if refused:
            raise Unauthorized(f"MQTT broker refused subscriptions: {refused}")

    async def unsubscribe(self, filters: Iterable[str]) -> None:
        topics = list(filters)
        if topics:
            try:
                await self._client.unsubscribe(topics)
            except (AMQTTError, OSError) as exc:
                raise PeerUnavailable(f"MQTT unsubscribe failed: {exc!r}") from exc

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        try:
            await self._client.publish(topic, payload, qos=qos)
        except (AMQTTError, OSError) as exc:
            raise PeerUnavailable(f"MQTT publish to {topic!r} failed: {exc!r}") from exc

    async def messages(self) -> AsyncIterator[ReceivedMessage]:
        """Received messages until the connection ends (then PeerUnavailable)."""
        while True:
            try:
                msg = await self._client.deliver_message()
            except (ClientError, AMQTTError, OSError) as exc:
                raise PeerUnavailable(f"MQTT connection lost: {exc!r}") from exc
            if msg is None:
                raise PeerUnavailable("MQTT connection lost")
            yield ReceivedMessage(msg.topic, bytes(msg.data or b""))

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            try:
                async with asyncio.timeout(5.0):
                    await self._client.disconnect()
            except (TimeoutError, AMQTTError, OSError) as exc:
                log.debug("MQTT disconnect: %r", exc)
