"""The controller's MQTT side: one paho-mqtt 2.x connection bridged to asyncio, and the
subscriptions of `run` (the whole fleet, events optionally through a shared subscription).

paho runs its network thread (`loop_start`) without its own reconnect; `supervise` reconnects
with capped, jittered backoff (`edge.mqtt.backoff_delay`) and resubscribes on every connect.
Callbacks named `_on_*` run on paho's thread and reach the loop only through
`call_soon_threadsafe`.

Incoming QoS 1 messages are acknowledged by the controller (`Message.ack`) after they are
handled (recorded in the database), not on receipt: a crash in between leaves the message with
the broker, which sends it again. The incoming queue is unbounded for the same reason: the
broker's receive-maximum window bounds it (paho's default 65535, lowered here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from controller.errors import ControllerError
from controller.settings import ControllerMqttSettings
from edge.aio import sleep_unless
from edge.mqtt import backoff_delay
from edge.mqtt_client import AUTH_FAILURES
from edge.topics import Kind, fleet_filter

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0
SUBSCRIBE_TIMEOUT_S = 15.0
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


def build_tls_context(settings: ControllerMqttSettings) -> ssl.SSLContext:
    """TLS with CA verification (system CAs unless a CA file is set), optional client cert."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
        )
        if settings.tls_cert_file is not None:
            context.load_cert_chain(
                str(settings.tls_cert_file),
                str(settings.tls_key_file) if settings.tls_key_file else None,
            )
    except (OSError, ssl.SSLError) as exc:
        raise MqttError(
            f"SOUNDEDGE_CONTROLLER_MQTT__TLS_*: cannot load certificates: {exc}"
        ) from exc
    if settings.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Connection:
    """One MQTT connection of the controller; closed for good once it drops."""

    def __init__(
        self,
        settings: ControllerMqttSettings,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        *,
        persistent: bool,
    ) -> None:
        self.settings = settings
        self.is_v5 = settings.protocol == "5"
        self.persistent = persistent and settings.session_expiry_s > 0
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_reason = "not connected"
        self._loop = loop
        self._connack: asyncio.Future[ReasonCode] = loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._pubacks: dict[int, asyncio.Future[None]] = {}
        self._started = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.is_v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.is_v5 else not self.persistent,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        self._client.connect_timeout = 10.0
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        if settings.tls:
            self._client.tls_set_context(build_tls_context(settings))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_publish = self._on_publish

    # -- opening and closing --------------------------------------------------------------------

    async def open(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and wait for the CONNACK; raise MqttAuthError or MqttError."""
        host, port = self.settings.host, self.settings.port
        properties = None
        if self.is_v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            if self.persistent:
                properties.SessionExpiryInterval = self.settings.session_expiry_s
        # clean_start is an MQTT 5 notion; 3.1.1 sets clean_session in the constructor.
        extra: dict[str, Any] = (
            {"clean_start": not self.persistent, "properties": properties} if self.is_v5 else {}
        )
        try:
            await asyncio.wait_for(
                asyncio.to_thread(
                    self._client.connect, host, port, self.settings.keepalive_s, **extra
                ),
                timeout_s,
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise MqttError(
                f"cannot connect to {host}:{port}: {exc or type(exc).__name__}"
            ) from exc
        self._client.loop_start()
        self._started = True
        try:
            reason = await asyncio.wait_for(asyncio.shield(self._connack), timeout_s)
        except TimeoutError as exc:
            raise MqttError(f"no CONNACK from {host}:{port} within {timeout_s:.0f} s") from exc
        if reason.value in AUTH_FAILURES:
            raise MqttAuthError(f"{host}:{port} refused the login: {reason}")
        if reason.is_failure:
            raise MqttError(f"{host}:{port} refused the connection: {reason}")

    async def close(self, timeout_s: float = 5.0) -> None:
        if not self._started:
            self._client.reinitialise()  # closes a socket a failed connect may have left
            return
        if not self.closed.is_set():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), timeout_s)
        await asyncio.to_thread(self._client.loop_stop)
        self._client.reinitialise()
        self._started = False
        self._async_fail_pending()

    # -- requests (called on the loop) ------------------------------------------------------

    async def unsubscribe(self, filters: list[str], timeout_s: float = SUBSCRIBE_TIMEOUT_S) -> None:
        """Unsubscribe and wait for the UNSUBACK (a filter not subscribed is fine)."""
        result, mid = self._client.unsubscribe(filters)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"unsubscribe failed: {paho.error_string(result)}")
        future: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subacks[mid] = future
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError as exc:
            raise MqttError(f"no UNSUBACK within {timeout_s:.0f} s") from exc

    async def subscribe(self, filters: list[str], timeout_s: float = SUBSCRIBE_TIMEOUT_S) -> None:
        """Subscribe with QoS 1 and wait for the SUBACK; raise MqttError if refused."""
        if self.is_v5:
            options = SubscribeOptions(qos=1)
            result, mid = self._client.subscribe([(f, options) for f in filters])
        else:
            result, mid = self._client.subscribe([(f, 1) for f in filters])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"subscribe failed: {paho.error_string(result)}")
        future: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subacks[mid] = future
        try:
            codes = await asyncio.wait_for(future, timeout_s)
        except TimeoutError as exc:
            raise MqttError(f"no SUBACK within {timeout_s:.0f} s") from exc
        refused = [f for f, code in zip(filters, codes, strict=False) if code.is_failure]
        if refused:
            raise MqttError(
                f"the broker refused the subscription to {', '.join(refused)} (check the ACL "
                f"of user {self.settings.username!r})"
            )

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> asyncio.Future[None]:
        """Queue a message; the future resolves at PUBACK (QoS 1)."""
        future: asyncio.Future[None] = self._loop.create_future()
        properties = None
        if self.is_v5 and (response_topic or correlation_data):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data:
                properties.CorrelationData = correlation_data
        info = self._client.publish(topic, payload, qos=qos, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            future.set_exception(
                MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            )
            return future
        if qos == 0:
            future.set_result(None)
        else:
            self._pubacks[info.mid] = future
        return future

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0 and not self.closed.is_set():
            self._client.ack(mid, qos)

    # -- paho's thread --------------------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._async_connack, reason_code)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._async_closed, str(reason_code))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._async_suback, mid, list(reason_codes))

    def _on_unsubscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._async_suback, mid, list(reason_codes))

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._async_puback, mid, reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        correlation = None
        if message.properties is not None:
            correlation = getattr(message.properties, "CorrelationData", None)
        incoming = Message(
            message.topic,
            bytes(message.payload),
            bool(message.retain),
            message.qos,
            message.mid,
            correlation,
            self._ack,
        )
        self._loop.call_soon_threadsafe(self.messages.put_nowait, incoming)

    # -- back on the loop -----------------------------------------------------------------------

    def _async_connack(self, reason_code: ReasonCode) -> None:
        if not self._connack.done():
            self._connack.set_result(reason_code)

    def _async_closed(self, reason: str) -> None:
        self.close_reason = reason
        self.closed.set()
        if not self._connack.done():
            self._connack.set_exception(MqttError(f"connection closed before CONNACK: {reason}"))
            self._connack.exception()  # retrieved: nobody may be waiting any more
        self._async_fail_pending()

    def _async_suback(self, mid: int, codes: list[ReasonCode]) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(codes)

    def _async_puback(self, mid: int, reason_code: ReasonCode) -> None:
        future = self._pubacks.pop(mid, None)
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(MqttError(f"the broker refused the message: {reason_code}"))
        else:
            future.set_result(None)

    def _async_fail_pending(self) -> None:
        error = MqttError(f"connection lost ({self.close_reason})")
        futures: list[asyncio.Future[Any]] = [*self._subacks.values(), *self._pubacks.values()]
        self._subacks.clear()
        self._pubacks.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)


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
    rng = random.Random()
    attempt = 0
    while not stop.is_set():
        conn = Connection(settings, client_id, loop, persistent=True)
        try:
            await _until(conn.open(), stop)
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
            delay = backoff_delay(attempt, settings.reconnect_min_s, settings.reconnect_max_s, rng)
            (logger.warning if attempt == 0 else logger.info)(
                "MQTT: %s; retrying in %.1f s", exc, delay
            )
            attempt += 1
            await sleep_unless(stop, delay)
            continue
        attempt = 0
        logger.info(
            "MQTT connected to %s:%d as %s (%s)",
            settings.host,
            settings.port,
            client_id,
            ", ".join(filters),
        )
        try:
            await _until(_run_session(conn, session), stop)
        finally:
            await conn.close()
        if not stop.is_set():
            delay = backoff_delay(0, settings.reconnect_min_s, settings.reconnect_max_s, rng)
            logger.warning(
                "MQTT connection lost (%s); reconnecting in %.1f s", conn.close_reason, delay
            )
            await sleep_unless(stop, delay)


async def _run_session(conn: Connection, session: Session) -> None:
    """Run `session` until it returns or the connection drops."""
    task = asyncio.ensure_future(session(conn))
    closed = asyncio.ensure_future(conn.closed.wait())
    try:
        await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(awaitable: Awaitable[None], stop: asyncio.Event) -> None:
    """Await `awaitable` unless `stop` is set first (then it is cancelled)."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
