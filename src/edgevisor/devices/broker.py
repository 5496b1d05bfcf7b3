"""The embedded MQTT broker (amqtt 0.12, MQTT 3.1.1) with registry-backed auth and ACLs.

amqtt loads plugins by dotted class path and hands each a dataclass ``Config`` built from
plain data, so the live policy object cannot be passed in directly: each broker registers
its :class:`BrokerPolicy` under a random key in ``_POLICIES`` and the plugins look it up.

Who may connect: a registered device whose password matches its stored hash, or the agent's
own privileged client (username :data:`AGENT_USERNAME`, a random password made at start and
held only in memory). Anything else — no username, unknown name, wrong password — gets
CONNACK "not authorized" and the connection is closed.

In-process link. Besides its TCP client, the agent can attach to the embedded broker
directly (:meth:`EmbeddedBroker.attach`): :class:`AgentTapPlugin` hands every message the
broker accepted for delivery (i.e. after the ACL check) to the agent, and
:meth:`EmbeddedBroker.publish` injects the agent's replies into the broker's delivery queue.
This skips two MQTT encode/decode/TCP hops per routed message, which is where most of the
time of a routed round trip goes with amqtt.

amqtt internals overridden for speed and for losing nothing at a client's end live in
:mod:`edgevisor.devices.broker_amqtt`.

TLS listener (``devices.tls_port``): the same broker also listens with TLS and *requires*
a client certificate of the agent's devices CA (:mod:`edgevisor.devices.tls`; amqtt's own
context would make it optional). There the certificate is the credential: its CN must be a
registered device whose current certificate serial it carries, not on the revocation list
(:meth:`BrokerPolicy.authenticate_cert`); the CN becomes the session's username, so ACLs
and counters work as for a password login. A removed device's connections are closed
(:meth:`EmbeddedBroker.disconnect`).

What they may do: the agent anything; a device what its ACL says
(:meth:`edgevisor.devices.registry.DeviceRegistry.acl`). A PUBLISH outside the ACL is
acknowledged as MQTT requires and dropped (counted per device in ``stats``); a SUBSCRIBE
outside it gets return code 0x80. RECEIVE is not re-checked per message: what a client can
subscribe to is already what it may read, and a check per delivered message costs time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session

from edgevisor.devices.broker_amqtt import _FAST_PATH, _FastBroker, _PlainBroker
from edgevisor.devices.registry import DeviceRegistry, verify_password
from edgevisor.errors import UnavailableError

if TYPE_CHECKING:

    from edgevisor.devices.tls import DevicesTLS

__all__ = ["AGENT_USERNAME", "BrokerPolicy", "BrokerStats", "EmbeddedBroker", "Tap"]

log = logging.getLogger(__name__)

# Device names must start with a letter or digit, so this can never be a device.
AGENT_USERNAME = "_edgevisor-agent"

_POLICIES: dict[str, BrokerPolicy] = {}


@dataclass
class BrokerStats:
    connections_accepted: int = 0
    connections_refused: int = 0
    publishes_dropped: Counter[str] = field(default_factory=Counter)
    subscriptions_refused: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "connections_accepted": self.connections_accepted,
            "connections_refused": self.connections_refused,
            "publishes_dropped": dict(self.publishes_dropped),
            "publishes_dropped_total": sum(self.publishes_dropped.values()),
            "subscriptions_refused": dict(self.subscriptions_refused),
        }


Tap = Callable[[str, bytes], Awaitable[None]]


class BrokerPolicy:
    """Authentication and authorization decisions for one broker."""

    def __init__(self, registry: DeviceRegistry, agent_password: str) -> None:
        self.registry = registry
        self.agent_password = agent_password
        self.stats = BrokerStats()
        self.tap: Tap | None = None

    async def authenticate(self, username: str | None, password: str | None) -> bool:
        ok = await self._check(username, password)
        if ok:
            self.stats.connections_accepted += 1
        else:
            self.stats.connections_refused += 1
            log.info("mqtt connection refused for username %r", username)
        return ok

    def authenticate_cert(
        self, peercert: dict[str, Any] | None, username: str | None
    ) -> str | None:
        """A TLS login: the device the verified client certificate names, or None."""
        from edgevisor.devices.tls import check_peer, peer_identity

        ident = peer_identity(peercert)
        cn = ident[0] if ident else None
        verdict = check_peer(
            ident,
            current_serial=self.registry.cert_serial(cn) if cn else None,
            revoked=ident is not None and self.registry.is_revoked(ident[1]),
            username=username,
        )
        if verdict.ok:
            self.stats.connections_accepted += 1
            return verdict.device
        self.stats.connections_refused += 1
        log.info("mqtt TLS connection refused for %r: %s", cn, verdict.reason)
        return None

    async def _check(self, username: str | None, password: str | None) -> bool:
        if not username or password is None:
            return False
        if username == AGENT_USERNAME:
            return hmac.compare_digest(password.encode(), self.agent_password.encode())
        stored = self.registry.password_hash(username)
        if stored is None:
            return False
        # scrypt takes tens of ms; keep it off the event loop that carries all traffic.
        return await asyncio.to_thread(verify_password, password, stored)

    def allow(self, username: str | None, action: Action, topic: str) -> bool:
        if username == AGENT_USERNAME or action == Action.RECEIVE:
            return True
        if not username:
            return False
        acl = self.registry.acl(username)
        if action == Action.PUBLISH:
            if acl.may_publish(topic):
                return True
            self.stats.publishes_dropped[username] += 1
            log.info("mqtt publish by %s to %r dropped: outside its ACL", username, topic)
            return False
        if acl.may_subscribe(topic):
            return True
        self.stats.subscriptions_refused[username] += 1
        return False


def _policy(context: BaseContext) -> BrokerPolicy:
    key = getattr(context.config, "policy_key", "")
    try:
        return _POLICIES[key]
    except KeyError:
        raise RuntimeError(f"no broker policy registered under {key!r}") from None


class RegistryAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt auth plugin: devices from the registry plus the agent's own client."""

    @dataclass
    class Config:
        policy_key: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        policy = _policy(self.context)
        ssl_object = getattr(session, "ssl_object", None)
        if ssl_object is not None:
            # Only the TLS listener has TLS, and it demands a verified certificate: the
            # certificate is the credential and its CN becomes the username (for ACLs).
            device = policy.authenticate_cert(ssl_object.getpeercert(), session.username)
            if device is None:
                return False
            session.username = device
            return True
        return await policy.authenticate(session.username, session.password)


class RegistryTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic plugin: per-device publish/subscribe ACLs."""

    @dataclass
    class Config:
        policy_key: str = ""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        return _policy(self.context).allow(session.username, action, topic)


class AgentTapPlugin(BasePlugin):  # type: ignore[misc]
    """amqtt plugin: gives the attached agent every message accepted for delivery."""

    @dataclass
    class Config:
        policy_key: str = ""

    async def on_broker_message_broadcast(self, *, client_id: str, message: Any) -> None:
        tap = _policy(self.context).tap
        if tap is not None and message is not None and message.topic:
            await tap(message.topic, bytes(message.data or b""))


# The fast path overrides four private amqtt 0.12 methods; on an amqtt without them (or with
# other signatures) the broker falls back to the plugin hooks, which decide the same way.
async def _close_writer(writer: Any) -> None:
    try:
        await writer.close()
    except Exception as exc:  # the peer may be gone already
        log.debug("closing an MQTT connection: %r", exc)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """An amqtt broker run inside the agent's event loop."""

    def __init__(
        self,
        registry: DeviceRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        tls: DevicesTLS | None = None,
        tls_port: int | None = None,
    ):
        self.host = host
        self.port = port
        self.tls = tls
        self.tls_port = tls_port if tls is not None else None
        self.agent_password = secrets.token_urlsafe(24)
        self.policy = BrokerPolicy(registry, self.agent_password)
        self._key = secrets.token_hex(8)
        self._broker: Broker | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def stats(self) -> BrokerStats:
        return self.policy.stats

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        return None if self.tls_port is None else f"mqtts://{self.host}:{self.tls_port}"

    async def start(self) -> None:
        if self.port == 0:
            # amqtt does not expose the bound port; pick one (tiny race, tests only).
            self.port = _free_port(self.host)
        if self.tls_port == 0:
            self.tls_port = _free_port(self.host)
        _POLICIES[self._key] = self.policy
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}}
        if self.tls is not None and self.tls_port is not None:
            listeners["tls"] = {
                "type": "tcp",
                "bind": f"{self.host}:{self.tls_port}",
                "ssl": True,
                "certfile": str(self.tls.cert_path),
                "keyfile": str(self.tls.key_path),
                "cafile": str(self.tls.ca_path),
            }
        config: dict[str, Any] = {
            "listeners": listeners,
            "plugins": {
                f"{__name__}.RegistryAuthPlugin": {"policy_key": self._key},
                f"{__name__}.RegistryTopicPlugin": {"policy_key": self._key},
                f"{__name__}.AgentTapPlugin": {"policy_key": self._key},
            },
        }
        namespace = f"edgevisor.broker.{self._key}"
        if _FAST_PATH:
            # The tap plugin would hand every message over a second time.
            del config["plugins"][f"{__name__}.AgentTapPlugin"]
            broker: Broker = _FastBroker(config, self.policy, self.tls, plugin_namespace=namespace)
        else:
            broker = _PlainBroker(config, self.tls, plugin_namespace=namespace)
        try:
            await broker.start()
        except Exception as exc:
            _POLICIES.pop(self._key, None)
            raise UnavailableError(
                f"MQTT broker cannot listen on {self.host}:{self.port}: {exc}"
            ) from exc
        self._broker = broker
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)

    def disconnect(self, username: str) -> int:
        """Close the connections logged in as ``username`` (a removed device); returns how
        many. The close runs as tasks; new logins are already refused by then."""
        broker = self._broker
        if broker is None:
            return 0
        sessions: dict[str, tuple[Session, Any]] = getattr(broker, "_sessions", {})
        closing = 0
        for session, handler in list(sessions.values()):
            if session.username != username or handler is None:
                continue
            writer = getattr(handler, "writer", None)
            if writer is None:
                continue
            closing += 1
            task = asyncio.get_running_loop().create_task(_close_writer(writer))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if closing:
            log.info("closed %d MQTT connection(s) of %s", closing, username)
        return closing

    def attach(self, tap: Tap | None) -> None:
        """Receive every delivered message in-process (None detaches)."""
        self.policy.tap = tap

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish as the agent without a network hop."""
        if self._broker is None:
            raise UnavailableError("the embedded MQTT broker is not running")
        await self._broker.internal_message_broadcast(topic, payload, qos)

    async def stop(self) -> None:
        self.policy.tap = None
        broker, self._broker = self._broker, None
        try:
            if broker is not None:
                await broker.shutdown()
        finally:
            _POLICIES.pop(self._key, None)
