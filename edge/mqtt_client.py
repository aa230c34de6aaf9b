"""One connection to the broker: a paho-mqtt 2.x client bridged to asyncio.

paho runs its own network thread (`loop_start`) with its automatic reconnect switched off
(`reconnect_on_failure=False`): the supervisor in `edge.mqtt` decides when to reconnect (capped,
jittered backoff) and builds a fresh `Connection` each time, so no half-dead session state
survives a drop; the outbox resends whatever was not acknowledged.

Callbacks named `_on_*` run on paho's thread and reach the loop only through
`call_soon_threadsafe`. `publish` and `subscribe` are called on the loop: in threaded mode paho
only queues the packet and wakes its thread, so the socket is used by one thread only.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.errors import SoundedgeError
from edge.settings import MqttSettings

logger = logging.getLogger(__name__)

# CONNACK reason codes that mean "your credentials are wrong": retrying cannot help.
# 0x86 bad user name or password, 0x87 not authorized, 0x8C bad authentication method
# (paho maps MQTT 3.1.1 return codes 4 and 5 to 0x86 and 0x87).
AUTH_FAILURES = frozenset({0x86, 0x87, 0x8C})
INCOMING_QUEUE = 64


class MqttError(SoundedgeError):
    """The broker connection failed or was lost."""


class MqttAuthError(MqttError):
    """The broker refused the credentials; the supervisor stops retrying."""


class MqttPublishRefusedError(MqttError):
    """The broker answered a publish with a failure reason code (MQTT 5), e.g. ACL denied."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message received on a subscribed topic."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


def build_tls_context(settings: MqttSettings) -> ssl.SSLContext:
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
        raise MqttError(f"SOUNDEDGE_MQTT__TLS_*: cannot load certificates: {exc}") from exc
    if settings.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Connection:
    """A single MQTT connection; closed for good once it drops."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        will: tuple[str, str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.settings = settings
        self._loop = loop
        self.is_v5 = settings.protocol == "5"
        self.messages: asyncio.Queue[Incoming] = asyncio.Queue(INCOMING_QUEUE)
        self.closed = asyncio.Event()
        self.close_reason = "not connected"
        self._connack: asyncio.Future[ReasonCode] = loop.create_future()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._started = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.is_v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.is_v5 else True,
            reconnect_on_failure=False,
        )
        self._client.connect_timeout = 10.0
        # Our own window bounds what is in flight; let paho send all of it at once.
        self._client.max_inflight_messages_set(128)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        if settings.tls:
            self._client.tls_set_context(build_tls_context(settings))
        topic, payload = will
        self._client.will_set(topic, payload, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    # -- opening and closing --------------------------------------------------------------------

    async def open(self, timeout_s: float) -> None:
        """Connect and wait for the CONNACK. Raises MqttAuthError or MqttError."""
        host, port = self.settings.host, self.settings.port
        # MQTT 5: a fresh session each time (the outbox resends); 3.1.1: clean_session above.
        clean_start: paho.CleanStartOption = (
            True if self.is_v5 else paho.MQTT_CLEAN_START_FIRST_ONLY
        )
        try:
            await asyncio.wait_for(
                asyncio.to_thread(
                    self._client.connect,
                    host,
                    port,
                    self.settings.keepalive_s,
                    clean_start=clean_start,
                ),
                timeout_s,
            )
        except (OSError, TimeoutError, ValueError) as exc:
            # ssl.SSLError is an OSError: a certificate problem is reported here too.
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
        """Disconnect cleanly (no last will) if connected, and stop the network thread."""
        if not self._started:
            self._client.reinitialise()  # closes a socket a failed connect may have left
            return
        if not self.closed.is_set():
            self._client.disconnect()
            try:
                await asyncio.wait_for(self.closed.wait(), timeout_s)
            except TimeoutError:
                logger.warning("the broker did not confirm the disconnect in %.0f s", timeout_s)
        await asyncio.to_thread(self._client.loop_stop)
        # loop_start() made a socket pair that paho closes only when the client is collected;
        # reinitialise() is the public way to close it now (the client is not reused).
        self._client.reinitialise()
        self._started = False
        self._async_fail_pending()

    # -- publishing and subscribing ---------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> asyncio.Future[None]:
        """Queue a message; the future resolves at PUBACK (QoS 1) or once sent (QoS 0).

        It fails with MqttError if the connection is lost first, or MqttPublishRefusedError if the
        broker refuses the message.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        if self.closed.is_set():
            future.set_exception(MqttError(f"not connected ({self.close_reason})"))
            return future
        properties = None
        if correlation_data is not None and self.is_v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation_data
        try:
            info = self._client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
        except ValueError as exc:  # a topic with wildcards, e.g. a bad response topic
            future.set_exception(MqttPublishRefusedError(f"cannot publish to {topic!r}: {exc}"))
            return future
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            future.set_exception(
                MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            )
            return future
        # The PUBACK callback reaches the loop through call_soon_threadsafe, so it always runs
        # after this line has registered the message id.
        self._pending[info.mid] = future
        return future

    def subscribe(self, topic: str, qos: int = 1) -> None:
        result, _mid = self._client.subscribe(topic, qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"subscribe to {topic} failed: {paho.error_string(result)}")

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

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._async_published, mid, reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        response_topic = correlation = None
        props = message.properties
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
        incoming = Incoming(message.topic, bytes(message.payload), response_topic, correlation)
        self._loop.call_soon_threadsafe(self._async_received, incoming)

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

    def _async_fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(MqttError(f"connection lost ({self.close_reason})"))

    def _async_published(self, mid: int, reason_code: ReasonCode) -> None:
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(MqttPublishRefusedError(str(reason_code)))
        else:
            future.set_result(None)

    def _async_received(self, incoming: Incoming) -> None:
        try:
            self.messages.put_nowait(incoming)
        except asyncio.QueueFull:
            logger.warning("dropping a message on %s: too many commands at once", incoming.topic)
