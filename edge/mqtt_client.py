"""One connection to the broker: a paho-mqtt 2.x client bridged to asyncio, for the agent and
the controller alike.

`MqttBridge` is the part both sides share: the paho client, credentials and TLS, the CONNACK,
the acknowledgements of what it sends, the received messages and a clean close. Each side
subclasses it for its own exceptions and messages: `Connection` here is the agent's (last will
`offline`, `set` commands as `Incoming`), `controller.mqtt.Connection` the controller's
(persistent session, messages acknowledged once handled).

paho runs its own network thread (`loop_start`) with its automatic reconnect switched off
(`reconnect_on_failure=False`): each side's supervisor decides when to reconnect (capped,
jittered backoff: `Backoff`) and builds a fresh connection each time, so no half-dead
session state survives a drop; the agent's outbox resends whatever was not acknowledged.

Callbacks named `_on_*` run on paho's thread and reach the loop only through
`call_soon_threadsafe`. Requests (`publish`, subscribing, acknowledging) are made on the loop:
in threaded mode paho only queues the packet and wakes its thread, so the socket is used by one
thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import SecretStr

from edge.aio import sleep_unless
from edge.errors import SoundedgeError
from edge.settings import MqttSettings

logger = logging.getLogger(__name__)

# CONNACK reason codes that mean "your credentials are wrong": retrying cannot help.
# 0x86 bad user name or password, 0x87 not authorized, 0x8C bad authentication method
# (paho maps MQTT 3.1.1 return codes 4 and 5 to 0x86 and 0x87).
AUTH_FAILURES = frozenset({0x86, 0x87, 0x8C})
CONNECT_TIMEOUT_S = 15.0
SUBSCRIBE_TIMEOUT_S = 15.0
INCOMING_QUEUE = 64  # the agent's commands waiting to be applied, at most

T = TypeVar("T")
MessageT = TypeVar("MessageT")


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff capped at `max_s`, with "equal jitter" so a fleet does not reconnect
    in lockstep after a broker restart: a delay in [cap/2, cap]."""
    cap = min(max_s, min_s * 2.0 ** min(attempt, 30))
    return cap / 2.0 + rng.uniform(0.0, cap / 2.0)


# A session that lasted this long resets the reconnect backoff; a shorter one counts as a
# failed attempt, so a broker that accepts and then drops a client at once (flapping, another
# client with the same client id, a refused message) is not hammered.
STABLE_SESSION_S = 30.0
# After the broker refused what was sent, the longest wait: an operator must act.
_REFUSED_ATTEMPT = 30


class Backoff:
    """When to try the broker again, for the agent's and the controller's supervisors alike.

    Each failed connect doubles the wait (`backoff_delay`, from `min_s` up to `max_s`); only a
    session that lasted `STABLE_SESSION_S` starts again from `min_s`.
    """

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0  # failures in a row: connects, or sessions that did not last
        self._rng = rng or random.Random()

    def connect_failed(self) -> float:
        """Seconds to wait after a connect that did not succeed."""
        return self._next()

    def session_ended(self, lasted_s: float, *, refused: bool = False) -> float:
        """Seconds to wait after a session that lasted `lasted_s` ended; `refused`: the broker
        refused what the client sent (the longest wait)."""
        if refused:
            self.attempt = max(self.attempt, _REFUSED_ATTEMPT)
        elif lasted_s >= STABLE_SESSION_S:
            self.attempt = 0
        return self._next()

    def _next(self) -> float:
        delay = backoff_delay(self.attempt, self.min_s, self.max_s, self._rng)
        self.attempt += 1
        return delay


async def run_until(awaitable: Awaitable[T], *events: asyncio.Event) -> T | None:
    """The result of `awaitable`, or None if one of `events` is set first: it is then cancelled
    and waited for (also when this call itself is cancelled)."""
    task = asyncio.ensure_future(awaitable)
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


class BrokerSettings(Protocol):
    """The broker connection as both `MqttSettings` and `ControllerMqttSettings` describe it."""

    host: str
    port: int
    username: str | None
    password: SecretStr | None
    protocol: Literal["5", "3.1.1"]
    keepalive_s: int
    tls: bool
    tls_ca_file: Path | None
    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_insecure: bool


class MqttBridge(ABC, Generic[MessageT]):
    """A single MQTT connection; closed for good once it drops.

    A subclass names its exceptions and the settings' environment prefix (both appear in error
    messages) and turns a received paho message into its own `MessageT` (`_on_incoming`).
    """

    env_prefix: ClassVar[str]  # e.g. SOUNDEDGE_MQTT__
    error_class: ClassVar[type[Exception]]  # the connection failed or was lost
    auth_error_class: ClassVar[type[Exception]]  # the broker refused the credentials
    refused_error_class: ClassVar[type[Exception]]  # the broker refused a message

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        *,
        will: tuple[str, str] | None = None,
        session_expiry_s: int = 0,
        receive_maximum: int | None = None,
        max_inflight: int | None = None,
        manual_ack: bool = False,
        queue_size: int = 0,
    ) -> None:
        """`will`: topic and payload of the last will (QoS 1, retained). `session_expiry_s`:
        how long the broker keeps the session while we are away (0: a clean session each time).
        `receive_maximum`: unacknowledged QoS 1 messages the broker may send at once (MQTT 5).
        `manual_ack`: received QoS 1 messages are acknowledged by the subclass, not on receipt.
        `queue_size`: received messages waiting in `messages` (0: unbounded), later ones are
        dropped with a warning."""
        self.settings = settings
        self._loop = loop
        self.is_v5 = settings.protocol == "5"
        self.persistent = session_expiry_s > 0
        self.messages: asyncio.Queue[MessageT] = asyncio.Queue(queue_size)
        self.closed = asyncio.Event()
        self.close_reason = "not connected"
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._connack: asyncio.Future[ReasonCode] = loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}  # and UNSUBACKs
        self._pubacks: dict[int, asyncio.Future[None]] = {}
        self._started = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.is_v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.is_v5 else not self.persistent,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        self._client.connect_timeout = 10.0
        if max_inflight is not None:
            self._client.max_inflight_messages_set(max_inflight)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        if settings.tls:
            self._client.tls_set_context(self._tls_context())
        if will is not None:
            topic, payload = will
            self._client.will_set(topic, payload, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_suback
        self._client.on_unsubscribe = self._on_suback
        self._client.on_message = self._on_message

    def _tls_context(self) -> ssl.SSLContext:
        """TLS with CA verification (system CAs unless a CA file is set), optional client cert."""
        settings = self.settings
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
            raise self.error_class(
                f"{self.env_prefix}TLS_*: cannot load certificates: {exc}"
            ) from exc
        if settings.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # -- opening and closing --------------------------------------------------------------------

    async def open(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and wait for the CONNACK; raise `auth_error_class` or `error_class`."""
        host, port = self.settings.host, self.settings.port
        # clean_start is an MQTT 5 notion; 3.1.1 sets clean_session in the constructor.
        clean_start: paho.CleanStartOption = paho.MQTT_CLEAN_START_FIRST_ONLY
        properties = None
        if self.is_v5:
            clean_start = not self.persistent
            if self._receive_maximum is not None or self.persistent:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                if self._receive_maximum is not None:
                    properties.ReceiveMaximum = self._receive_maximum
                if self.persistent:
                    properties.SessionExpiryInterval = self._session_expiry_s
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.to_thread(
                    self._client.connect,
                    host,
                    port,
                    self.settings.keepalive_s,
                    clean_start=clean_start,
                    properties=properties,
                )
        except (OSError, TimeoutError, ValueError) as exc:
            # ssl.SSLError is an OSError: a certificate problem is reported here too.
            raise self.error_class(
                f"cannot connect to {host}:{port}: {exc or type(exc).__name__}"
            ) from exc
        self._client.loop_start()
        self._started = True
        try:
            async with asyncio.timeout(timeout_s):
                reason = await asyncio.shield(self._connack)
        except TimeoutError as exc:
            raise self.error_class(
                f"no CONNACK from {host}:{port} within {timeout_s:.0f} s"
            ) from exc
        if reason.value in AUTH_FAILURES:
            raise self.auth_error_class(f"{host}:{port} refused the login: {reason}")
        if reason.is_failure:
            raise self.error_class(f"{host}:{port} refused the connection: {reason}")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (no last will) if connected, and stop the network thread."""
        if not self._started:
            self._client.reinitialise()  # closes a socket a failed connect may have left
            return
        if not self.closed.is_set():
            self._client.disconnect()
            await sleep_unless(self.closed, timeout_s)
            if not self.closed.is_set():
                logger.warning("the broker did not confirm the disconnect in %.0f s", timeout_s)
        await asyncio.to_thread(self._client.loop_stop)
        # loop_start() made a socket pair that paho closes only when the client is collected;
        # reinitialise() is the public way to close it now (the client is not reused).
        self._client.reinitialise()
        self._started = False
        self._async_fail_pending()

    # -- requests (called on the loop) --------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        *,
        retain: bool = False,
    ) -> asyncio.Future[None]:
        """Queue a message; the future resolves at PUBACK (QoS 1) or once sent (QoS 0).

        It fails with `error_class` if the connection is lost first, or `refused_error_class`
        if the broker refuses the message. The response topic and correlation data are MQTT 5
        properties: not sent over 3.1.1.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        if self.closed.is_set():
            future.set_exception(self.error_class(f"not connected ({self.close_reason})"))
            return future
        properties = None
        if self.is_v5 and (response_topic is not None or correlation_data is not None):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
        try:
            info = self._client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
        except ValueError as exc:  # a topic with wildcards, e.g. a bad response topic
            future.set_exception(self.refused_error_class(f"cannot publish to {topic!r}: {exc}"))
            return future
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            future.set_exception(
                self.error_class(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            )
            return future
        # The PUBACK callback reaches the loop through call_soon_threadsafe, so it always runs
        # after this line has registered the message id.
        self._pubacks[info.mid] = future
        return future

    def _sent(self, what: str, result: tuple[MQTTErrorCode, int | None]) -> int:
        """The message id of a (UN)SUBSCRIBE paho accepted, else `error_class` naming `what`."""
        code, mid = result
        if code != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise self.error_class(f"{what} failed: {paho.error_string(code)}")
        return mid

    async def _acknowledged(
        self, what: str, ack: str, result: tuple[MQTTErrorCode, int | None], timeout_s: float
    ) -> list[ReasonCode]:
        """Wait for the SUBACK or UNSUBACK (`ack`) of a request paho just sent: its reason
        codes, one a topic filter."""
        mid = self._sent(what, result)
        # Registered before the first await: the acknowledgement cannot have been handled yet.
        future: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subacks[mid] = future
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError as exc:
            raise self.error_class(f"no {ack} within {timeout_s:.0f} s") from exc

    async def subscribe(
        self, filters: list[str], timeout_s: float = SUBSCRIBE_TIMEOUT_S
    ) -> list[str]:
        """Subscribe with QoS 1 and wait for the SUBACK; the filters the broker refused.

        Raises `error_class` if the request cannot be sent or no SUBACK comes in time.
        """
        if self.is_v5:
            result = self._client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        else:
            result = self._client.subscribe([(f, 1) for f in filters])
        codes = await self._acknowledged("subscribe", "SUBACK", result, timeout_s)
        return [f for f, code in zip(filters, codes, strict=False) if code.is_failure]

    def refusal(self, refused: list[str]) -> str:
        """What to tell the operator about refused subscriptions."""
        return (
            f"the broker refused the subscription to {', '.join(refused)} (check the ACL of "
            f"user {self.settings.username!r})"
        )

    def _refused(self, reason_code: ReasonCode) -> Exception:
        """The exception for a message the broker refused (MQTT 5 PUBACK reason code)."""
        return self.refused_error_class(str(reason_code))

    # -- paho's thread --------------------------------------------------------------------------

    @abstractmethod
    def _on_incoming(self, message: paho.MQTTMessage) -> MessageT:
        """A received message as this side hands it on through `messages`."""

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

    def _on_suback(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        """SUBACK and UNSUBACK alike."""
        self._loop.call_soon_threadsafe(self._async_suback, mid, list(reason_codes))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        incoming = self._on_incoming(message)
        self._loop.call_soon_threadsafe(self._async_received, message.topic, incoming)

    # -- back on the loop -----------------------------------------------------------------------

    def _async_connack(self, reason_code: ReasonCode) -> None:
        if not self._connack.done():
            self._connack.set_result(reason_code)

    def _async_closed(self, reason: str) -> None:
        self.close_reason = reason
        self.closed.set()
        if not self._connack.done():
            self._connack.set_exception(
                self.error_class(f"connection closed before CONNACK: {reason}")
            )
            self._connack.exception()  # retrieved: nobody may be waiting any more
        self._async_fail_pending()

    def _async_fail_pending(self) -> None:
        futures: list[asyncio.Future[Any]] = [*self._subacks.values(), *self._pubacks.values()]
        self._subacks.clear()
        self._pubacks.clear()
        for future in futures:
            if not future.done():
                future.set_exception(self.error_class(f"connection lost ({self.close_reason})"))

    def _async_published(self, mid: int, reason_code: ReasonCode) -> None:
        future = self._pubacks.pop(mid, None)
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(self._refused(reason_code))
        else:
            future.set_result(None)

    def _async_suback(self, mid: int, codes: list[ReasonCode]) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(codes)

    def _async_received(self, topic: str, incoming: MessageT) -> None:
        try:
            self.messages.put_nowait(incoming)
        except asyncio.QueueFull:
            logger.warning("dropping a message on %s: too many commands at once", topic)


# -- the agent's connection -------------------------------------------------------------------


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


class Connection(MqttBridge[Incoming]):
    """The agent's connection: a clean session with the last will `offline` on its status."""

    env_prefix = "SOUNDEDGE_MQTT__"
    error_class = MqttError
    auth_error_class = MqttAuthError
    refused_error_class = MqttPublishRefusedError

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        will: tuple[str, str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # Our own window bounds what is in flight; let paho send all of it at once.
        super().__init__(
            settings, client_id, loop, will=will, max_inflight=128, queue_size=INCOMING_QUEUE
        )

    def _on_incoming(self, message: paho.MQTTMessage) -> Incoming:
        return Incoming(
            message.topic,
            bytes(message.payload),
            getattr(message.properties, "ResponseTopic", None),
            getattr(message.properties, "CorrelationData", None),
        )
