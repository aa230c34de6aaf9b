"""The controller's MQTT side: its connection (the bridge of `edge.mqtt_client` with a
persistent session and manual acknowledgement), and the subscriptions of `run` (the whole
fleet, events optionally through a shared subscription).

`supervise` reconnects with the agent's policy (`edge.mqtt_client.Backoff`: capped, jittered,
reset only by a session that lasted) and resubscribes on every connect.

Incoming QoS 1 messages are acknowledged by the controller (`Message.ack`) after they are
handled (recorded in the database), not on receipt: a crash in between leaves the message with
the broker, which sends it again. The incoming queue is unbounded for the same reason: the
broker's receive-maximum window bounds it (paho's default 65535, lowered here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from controller.errors import ControllerError
from controller.settings import ControllerMqttSettings
from edge.aio import sleep_unless
from edge.mqtt_client import SUBSCRIBE_TIMEOUT_S, Backoff, MqttBridge, run_until
from edge.topics import Kind, fleet_filter

logger = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 1000  # unacknowledged QoS 1 messages the broker may send us at once
FLEET_KINDS: tuple[Kind, ...] = ("status", "info", "health", "config")


class MqttError(ControllerError):
    """The broker connection failed or was lost."""


class MqttAuthError(MqttError):
    """The broker refused the credentials: retrying cannot help."""


def shared_filter(group: str | None, topic_filter: str) -> str:
    """`$share/<group>/<filter>` (MQTT 5 shared subscription), or the filter itself."""
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def run_subscriptions(settings: ControllerMqttSettings) -> list[str]:
    """What `run` subscribes to: every device's state, and events (shared in a group).

    State topics are never shared: every controller of a group keeps the whole fleet's state,
    and brokers do not send retained messages to shared subscriptions.
    """
    prefix = settings.topic_prefix
    filters = [fleet_filter(prefix, kind) for kind in FLEET_KINDS]
    filters.append(shared_filter(settings.shared_group, fleet_filter(prefix, "event")))
    return filters


def stale_subscriptions(settings: ControllerMqttSettings) -> list[str]:
    """Filters a persistent session may still hold from an earlier configuration: the plain
    event filter once the controller joined a group (it would get every event as well)."""
    if settings.shared_group is None:
        return []
    return [fleet_filter(settings.topic_prefix, "event")]


@dataclass(slots=True)
class Message:
    """A received message; call `ack()` once it is handled (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    mid: int
    correlation_data: bytes | None = None
    _ack: Callable[[int, int], None] | None = field(default=None, repr=False)

    def ack(self) -> None:
        if self._ack is not None:
            ack, self._ack = self._ack, None
            ack(self.mid, self.qos)


class Connection(MqttBridge[Message]):
    """One MQTT connection of the controller; `persistent`: a session the broker keeps for
    `session_expiry_s` while the controller is away."""

    env_prefix = "SOUNDEDGE_CONTROLLER_MQTT__"
    error_class = MqttError
    auth_error_class = MqttAuthError
    refused_error_class = MqttError

    def __init__(
        self,
        settings: ControllerMqttSettings,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        *,
        persistent: bool,
    ) -> None:
        super().__init__(
            settings,
            client_id,
            loop,
            session_expiry_s=settings.session_expiry_s if persistent else 0,
            receive_maximum=RECEIVE_MAXIMUM,
            manual_ack=True,
        )

    async def unsubscribe(self, filters: list[str], timeout_s: float = SUBSCRIBE_TIMEOUT_S) -> None:
        """Unsubscribe and wait for the UNSUBACK (a filter not subscribed is fine)."""
        result = self._client.unsubscribe(filters)
        await self._acknowledged("unsubscribe", "UNSUBACK", result, timeout_s)

    async def subscribe(
        self, filters: list[str], timeout_s: float = SUBSCRIBE_TIMEOUT_S
    ) -> list[str]:
        """Subscribe with QoS 1 and wait for the SUBACK; raise MqttError if refused (a
        controller that cannot see the fleet has nothing to do)."""
        refused = await super().subscribe(filters, timeout_s)
        if refused:
            raise MqttError(self.refusal(refused))
        return refused

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0 and not self.closed.is_set():
            self._client.ack(mid, qos)

    def _refused(self, reason_code: ReasonCode) -> Exception:
        return MqttError(f"the broker refused the message: {reason_code}")

    def _on_incoming(self, message: paho.MQTTMessage) -> Message:
        return Message(
            message.topic,
            bytes(message.payload),
            bool(message.retain),
            message.qos,
            message.mid,
            getattr(message.properties, "CorrelationData", None),
            self._ack,
        )


async def connect_once(
    settings: ControllerMqttSettings, client_id: str, filters: list[str]
) -> Connection:
    """A clean, short-lived connection with `filters` subscribed (for CLI commands)."""
    conn = Connection(settings, client_id, asyncio.get_running_loop(), persistent=False)
    try:
        await conn.open()
        if filters:
            await conn.subscribe(filters)
    except BaseException:
        await conn.close()
        raise
    return conn


Session = Callable[[Connection], Awaitable[None]]


async def supervise(
    settings: ControllerMqttSettings,
    client_id: str,
    filters: list[str],
    session: Session,
    stop: asyncio.Event,
    stale: list[str] | None = None,
) -> None:
    """Keep a persistent connection with `filters` subscribed (and `stale` ones removed),
    running `session(conn)` on each one until `stop`; reconnect with backoff, give up only on
    an authentication failure."""
    loop = asyncio.get_running_loop()
    backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
    while not stop.is_set():
        conn = Connection(settings, client_id, loop, persistent=True)
        try:
            await run_until(conn.open(), stop)
            if stop.is_set():
                await conn.close()
                break
            if stale:
                await conn.unsubscribe(stale)
            await conn.subscribe(filters)
        except MqttAuthError as exc:
            logger.error(
                "MQTT: %s; not retrying: check SOUNDEDGE_CONTROLLER_MQTT__USERNAME and "
                "SOUNDEDGE_CONTROLLER_MQTT__PASSWORD (user %r)",
                exc,
                settings.username,
            )
            await conn.close()
            raise
        except MqttError as exc:
            await conn.close()
            log = logger.warning if backoff.attempt == 0 else logger.info
            delay = backoff.connect_failed()
            log("MQTT: %s; retrying in %.1f s", exc, delay)
            await sleep_unless(stop, delay)
            continue
        session_started = loop.time()
        logger.info(
            "MQTT connected to %s:%d as %s (%s)",
            settings.host,
            settings.port,
            client_id,
            ", ".join(filters),
        )
        try:
            await run_until(session(conn), stop, conn.closed)
        finally:
            await conn.close()
        if not stop.is_set():
            delay = backoff.session_ended(loop.time() - session_started)
            logger.warning(
                "MQTT connection lost (%s); reconnecting in %.1f s", conn.close_reason, delay
            )
            await sleep_unless(stop, delay)
