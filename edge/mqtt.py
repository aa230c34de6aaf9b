"""The MQTT publisher: availability, info, health, level, events and `set` commands.

`MqttPublisher.run(stop)` is one long-lived task of the agent. A supervisor connects with
capped, jittered exponential backoff (forever, except after an authentication failure) and
runs one session per connection: it subscribes to `set` (and waits for the SUBACK), announces
`online`, `info`, `config` and Home Assistant discovery, sends the outbox in order and publishes
health and level periodically. Event messages always go through the durable outbox
(`edge.outbox`) and leave it only at the broker's PUBACK, so the pipeline never waits for the
broker and nothing is lost while it is away. On `stop` the session sends what it can for a
moment, publishes `stopped` and disconnects cleanly (so the broker does not publish the
`offline` last will).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import platform
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from edge import __version__
from edge.aio import sleep_unless
from edge.bus import AgentEvent, EventBus, EventStarted
from edge.discovery import discovery_messages
from edge.errors import StorageError
from edge.messages.mqtt import (
    ConfigMessage,
    EventStartMessage,
    HealthMessage,
    InfoMessage,
    LevelMessage,
    SetError,
    SetReply,
)
from edge.mqtt_client import (
    Backoff,
    Connection,
    Incoming,
    MqttAuthError,
    MqttError,
    MqttPublishRefusedError,
    run_until,
)
from edge.outbox import Outbox, OutboxItem
from edge.runtime import CHANGEABLE, RuntimeChangeError, RuntimeConfig
from edge.settings import AgentSettings
from edge.state import AgentState
from edge.store import EventStore
from edge.sysinfo import CpuMeter, load_1m, soc_temperature_c
from edge.timeutil import utc_now
from edge.topics import (
    STATUS_OFFLINE,
    STATUS_ONLINE,
    STATUS_STOPPED,
    DeviceTopics,
    ha_status_topic,
)

logger = logging.getLogger(__name__)

EVENT_WINDOW = 64  # event messages in flight (sent, not yet acknowledged) at most
STOP_DRAIN_S = 3.0  # on stop, how long to keep sending queued events before `stopped`
STOPPED_ACK_TIMEOUT_S = 5.0
RESYNC_S = 5.0  # look at the event log even without a wake-up (e.g. after a bus overflow)
MAX_COMMAND_BYTES = 64 * 1024
COMMAND_ECHO_CHARS = 200


def _level(value: float) -> float | None:
    """Levels on the wire: rounded, and null while unknown (-inf before any audio)."""
    return round(value, 2) if math.isfinite(value) else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def runtime_view(settings: AgentSettings) -> dict[str, Any]:
    """The settings `set` can change, in the shape `set` accepts."""
    full = settings.model_dump(mode="json")
    view: dict[str, Any] = {}
    for key, fields in CHANGEABLE.items():
        value = full[key]
        view[key] = value if fields is None else {f: value[f] for f in sorted(fields)}
    return view


@dataclass(frozen=True, slots=True)
class _StoreStats:
    events_today: int
    last_event_seq: int
    outbox_depth: int
    uncollected_events: int
    files_deleted_collected: int
    files_lost_uncollected: int
    event_bytes: int
    disk_free_bytes: int


class MqttPublisher:
    """Publishes one agent's state and events to the broker and applies its `set` commands."""

    def __init__(
        self,
        settings: AgentSettings,
        runtime: RuntimeConfig,
        store: EventStore,
        bus: EventBus,
        state: AgentState,
        ws_url: str,
    ) -> None:
        self._mqtt = settings.mqtt
        self._device_id = settings.device_id
        self._runtime = runtime
        self._store = store
        self._state = state
        self._ws_url = ws_url
        self.topics = DeviceTopics(settings.mqtt.topic_prefix, settings.device_id)
        self.client_id = settings.mqtt.client_id or f"soundedge-{settings.device_id}"
        self.outbox = Outbox(settings.data_dir / "state", store, ws_url)
        # Subscribed now, not in run(): no event of the starting pipeline may slip past.
        self._events = bus.subscribe("mqtt", maxsize=1024)
        self._wake = asyncio.Event()  # the outbox may have something to send
        self._acked = asyncio.Event()  # cursors moved: persist them
        self._refused = asyncio.Event()  # the broker refused an event message
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error: SetError | None = None
        # `end` messages up to this seq may be sent: the pipeline announced them after their
        # `start`, which is then already in the outbox (the bus is read in order).
        self._ends_released = 0
        self._cpu = CpuMeter()
        self.connections = 0  # successful connects so far (for tests and logs)
        runtime.add_listener(self._on_settings_changed)

    # -- the task -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set; then `stopped`, a clean disconnect, and return."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.outbox.open)
        self._ends_released = self._store.newest_seq  # finished before this run: all of them
        try:
            async with asyncio.TaskGroup() as group:
                taker = group.create_task(self._async_take_events(), name="mqtt-events")
                flusher = group.create_task(self._async_flush_cursors(), name="mqtt-outbox-flush")
                await self._supervise(stop)
                taker.cancel()
                flusher.cancel()
            # Start messages still on the bus are written to the outbox for the next run.
            while not self._events.queue.empty():
                await self._async_take(self._events.queue.get_nowait())
        finally:
            try:
                await asyncio.to_thread(self.outbox.flush)
            except StorageError as exc:
                logger.error("%s", exc)
            self.outbox.close()

    async def _supervise(self, stop: asyncio.Event) -> None:
        mqtt = self._mqtt
        backoff = Backoff(mqtt.reconnect_min_s, mqtt.reconnect_max_s)
        while not stop.is_set():
            assert self._loop is not None
            try:
                conn = Connection(
                    mqtt, self.client_id, (self.topics.status, STATUS_OFFLINE), self._loop
                )
            except MqttError as exc:  # unreadable certificates: fix and restart
                logger.error("MQTT disabled: %s", str(exc))
                await stop.wait()
                return
            try:
                await run_until(conn.open(), stop)
            except MqttAuthError as exc:
                logger.error(
                    "MQTT: %s; not retrying: check SOUNDEDGE_MQTT__USERNAME and "
                    "SOUNDEDGE_MQTT__PASSWORD (user %r) and restart the agent",
                    str(exc),
                    mqtt.username,
                )
                await conn.close()
                await stop.wait()
                return
            except MqttError as exc:
                await conn.close()
                log = logger.warning if backoff.attempt == 0 else logger.info
                delay = backoff.connect_failed()
                # str(): a logged exception object would keep its traceback (and sockets) alive.
                log("MQTT: %s; retrying in %.1f s", str(exc), delay)
                await sleep_unless(stop, delay)
                continue
            if stop.is_set():
                await conn.close()
                return
            self.connections += 1
            session_started = self._loop.time()
            try:
                await self._session(conn, stop)
            except MqttError as exc:  # e.g. the connection dropped while subscribing
                logger.warning("MQTT session ended: %s", str(exc))
            finally:
                self._conn = None
                self.outbox.rewind()
                await conn.close()
            if not stop.is_set():
                delay = backoff.session_ended(
                    self._loop.time() - session_started, refused=self._refused.is_set()
                )
                self._refused.clear()
                logger.warning(
                    "MQTT connection lost (%s); reconnecting in %.1f s", conn.close_reason, delay
                )
                await sleep_unless(stop, delay)

    async def _session(self, conn: Connection, stop: asyncio.Event) -> None:
        self._conn = conn
        mqtt = self._mqtt
        logger.info("MQTT connected to %s:%d as %s", mqtt.host, mqtt.port, self.client_id)
        filters = [self.topics.set]
        if mqtt.discovery:
            filters.append(ha_status_topic(mqtt.discovery_prefix))
        # The SUBACK comes before `online`, so a refusal is found out and said, not silent.
        refused = await conn.subscribe(filters)
        if refused:
            # Events, health and files need no subscription: the agent goes on without them.
            logger.error(
                "MQTT: %s; `set` commands (and Home Assistant's restarts) will not reach this "
                "agent",
                conn.refusal(refused),
            )
        self._publish(conn, self.topics.status, STATUS_ONLINE, qos=1, retain=True)
        self._publish(conn, self.topics.info, _json(self._info_message()), qos=1, retain=True)
        self._publish(conn, self.topics.config, _json(self._config_message()), qos=1, retain=True)
        if mqtt.discovery:
            self._publish_discovery(conn)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._async_send_events(conn), name="mqtt-send"),
                group.create_task(self._async_health(conn), name="mqtt-health"),
                group.create_task(self._async_level(conn), name="mqtt-level"),
                group.create_task(self._async_commands(conn), name="mqtt-commands"),
            ]
            await run_until(stop.wait(), conn.closed, self._refused)
            if stop.is_set() and not conn.closed.is_set():
                await self._async_drain(conn, STOP_DRAIN_S)
            for task in tasks:
                task.cancel()
        if stop.is_set() and not conn.closed.is_set():
            try:
                async with asyncio.timeout(STOPPED_ACK_TIMEOUT_S):
                    await conn.publish(self.topics.status, STATUS_STOPPED, qos=1, retain=True)
            except (MqttError, TimeoutError) as exc:
                logger.warning("MQTT: could not publish 'stopped': %s", exc or "timeout")

    # -- events -------------------------------------------------------------------------------

    async def _async_take_events(self) -> None:
        while True:
            await self._async_take(await self._events.get())

    async def _async_take(self, event: AgentEvent) -> None:
        if self._events.overflowed:
            # `end` messages come from the event log anyway; only `start`s were missed.
            self._events.overflowed = False
            self._ends_released = self._store.newest_seq
            logger.warning("MQTT fell behind the pipeline; some 'start' messages were skipped")
        if isinstance(event, EventStarted):
            message = EventStartMessage(
                event_id=event.event_id,
                seq=event.seq,
                device_id=self._device_id,
                onset_time=event.onset_time,
                level_dbfs=_level(event.level_dbfs),
                noise_floor_dbfs=_level(event.noise_floor_dbfs),
            )
            try:
                await asyncio.to_thread(self.outbox.add_start, message)
            except StorageError as exc:
                logger.error("cannot queue the 'start' of event %d: %s", event.seq, exc)
                return
        else:
            self._ends_released = max(self._ends_released, event.record.seq)
        self._wake.set()

    async def _async_send_events(self, conn: Connection) -> None:
        """Keep up to EVENT_WINDOW outbox messages in flight, in order."""
        while True:
            self._wake.clear()
            room = EVENT_WINDOW - self.outbox.in_flight
            items = self.outbox.next_items(room, self._ends_released) if room > 0 else []
            for item in items:
                self.outbox.mark_sent(item)
                future = conn.publish(self.topics.event, item.payload, qos=1)
                future.add_done_callback(functools.partial(self._async_event_acked, item))
            if not items:
                try:
                    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that
                    # arrives as the wait ends, and this loop would then never stop.
                    async with asyncio.timeout(RESYNC_S):
                        await self._wake.wait()
                except TimeoutError:
                    # Safety net: an event in the log that the bus never announced still goes.
                    self._ends_released = self._store.newest_seq

    def _async_event_acked(self, item: OutboxItem, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self.outbox.ack(item)
            self._acked.set()
            self._wake.set()
        elif isinstance(exc, MqttPublishRefusedError):
            logger.error(
                "MQTT: the broker refused %s of event %d on %s (%s); check the ACL. "
                "The message stays queued",
                item.stream,
                item.seq,
                self.topics.event,
                exc,
            )
            self._refused.set()
        # Other failures are a lost connection: the outbox rewinds and resends.

    async def _async_flush_cursors(self) -> None:
        while True:
            await self._acked.wait()
            self._acked.clear()
            try:
                await asyncio.to_thread(self.outbox.flush)
            except StorageError as exc:
                logger.error("%s", exc)
                await asyncio.sleep(RESYNC_S)

    async def _async_drain(self, conn: Connection, timeout_s: float) -> None:
        """Give queued events a moment to reach the broker before a clean stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline and not conn.closed.is_set():
            if self.outbox.in_flight == 0 and not self.outbox.next_items(1):
                return
            await asyncio.sleep(0.05)

    # -- periodic state -----------------------------------------------------------------------

    async def _async_health(self, conn: Connection) -> None:
        while True:
            stats = await asyncio.to_thread(self._store_stats)
            payload = _json(self._health_message(stats))
            self._publish(conn, self.topics.health, payload, qos=1, retain=True)
            await self._wait_interval(lambda: self._runtime.settings.mqtt.health_interval_s)

    async def _async_level(self, conn: Connection) -> None:
        while True:
            if self._runtime.settings.mqtt.level_interval_s > 0:
                self._publish(conn, self.topics.level, _json(self._level_message()), qos=0)
            await self._wait_interval(lambda: self._runtime.settings.mqtt.level_interval_s)

    async def _wait_interval(self, interval_of: Callable[[], float]) -> None:
        """Sleep one interval; a runtime change of the interval takes effect within a second."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            interval = interval_of()
            remaining = (started + interval - loop.time()) if interval > 0 else 1.0
            if interval > 0 and remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 1.0))
            if interval <= 0 and interval_of() > 0:
                return

    def _store_stats(self) -> _StoreStats:
        """Blocking (the store's lock and the disk): run in a thread."""
        store = self._store
        return _StoreStats(
            events_today=store.events_on(utc_now().strftime("%Y-%m-%d")),
            last_event_seq=store.newest_seq,
            outbox_depth=self.outbox.depth,
            uncollected_events=store.uncollected_count,
            files_deleted_collected=store.counters.files_deleted_collected,
            files_lost_uncollected=store.counters.files_deleted_uncollected,
            event_bytes=store.event_bytes(),
            disk_free_bytes=store.disk_free_bytes(),
        )

    def _health_message(self, stats: _StoreStats) -> HealthMessage:
        state = self._state
        return HealthMessage(
            device_id=self._device_id,
            time=utc_now(),
            uptime_s=round(max(state.uptime_s(), 0.0), 1),
            enabled=self._runtime.settings.enabled,
            capture_state=state.capture_state,
            capture_error=state.capture_error,
            level_dbfs=_level(state.level_dbfs),
            peak_dbfs=_level(state.peak_dbfs),
            noise_floor_dbfs=_level(state.noise_floor_dbfs),
            event_active=state.event_active,
            overflows=state.overflows,
            stream_restarts=state.stream_restarts,
            dead_input=state.dead_input,
            events_today=stats.events_today,
            events_recorded=state.events_recorded,
            last_event_seq=stats.last_event_seq,
            outbox_depth=stats.outbox_depth,
            uncollected_events=stats.uncollected_events,
            files_deleted_collected=stats.files_deleted_collected,
            files_lost_uncollected=stats.files_lost_uncollected,
            event_bytes=stats.event_bytes,
            disk_free_bytes=stats.disk_free_bytes,
            cpu_percent=self._cpu.percent(),
            load_1m=load_1m(),
            soc_temperature_c=soc_temperature_c(),
        )

    def _level_message(self) -> LevelMessage:
        state = self._state
        return LevelMessage(
            device_id=self._device_id,
            time=utc_now(),
            level_dbfs=_level(state.level_dbfs),
            peak_dbfs=_level(state.peak_dbfs),
            noise_floor_dbfs=_level(state.noise_floor_dbfs),
            event_active=state.event_active,
        )

    def _info_message(self) -> InfoMessage:
        settings = self._runtime.settings
        return InfoMessage(
            device_id=self._device_id,
            version=__version__,
            host=socket.gethostname(),
            platform=platform.platform(terse=True),
            ws_url=self._ws_url,
            started_at=self._state.started_at,
            mqtt_protocol=self._mqtt.protocol,
            audio=settings.audio.model_dump(mode="json"),
            detector=settings.detector.model_dump(mode="json"),
            recording=settings.recording.model_dump(mode="json"),
        )

    def _config_message(self) -> ConfigMessage:
        return ConfigMessage(
            device_id=self._device_id,
            time=utc_now(),
            settings=runtime_view(self._runtime.settings),
            overrides=self._runtime.overrides,
            error=self._last_error,
        )

    def _publish_discovery(self, conn: Connection) -> None:
        for topic, payload in discovery_messages(self.topics, self._mqtt.discovery_prefix):
            self._publish(conn, topic, payload, qos=1, retain=True)

    # -- commands -------------------------------------------------------------------------------

    async def _async_commands(self, conn: Connection) -> None:
        ha_status = ha_status_topic(self._mqtt.discovery_prefix)
        while True:
            message = await conn.messages.get()
            if message.topic == self.topics.set:
                self._async_handle_set(conn, message)
            elif message.topic == ha_status and message.payload.strip() == b"online":
                logger.info("Home Assistant is online: republishing discovery")
                self._publish_discovery(conn)

    def _async_handle_set(self, conn: Connection, message: Incoming) -> None:
        error = self._apply_command(message.payload)
        if error is not None:
            logger.warning("MQTT: refused set command: %s", error)
        if message.response_topic:
            reply = SetReply(
                device_id=self._device_id,
                ok=error is None,
                error=error,
                settings=runtime_view(self._runtime.settings),
            )
            self._publish(
                conn,
                message.response_topic,
                _json(reply),
                qos=1,
                correlation_data=message.correlation_data,
            )
        elif error is not None:
            self._last_error = SetError(
                message=error,
                received_at=utc_now(),
                command=message.payload[:COMMAND_ECHO_CHARS].decode("utf-8", errors="replace"),
            )
            self._publish(conn, self.topics.config, _json(self._config_message()), retain=True)

    def _apply_command(self, payload: bytes) -> str | None:
        """Apply a `set` payload; the error (naming what is wrong) or None if applied."""
        if len(payload) > MAX_COMMAND_BYTES:
            return f"command too large ({len(payload)} bytes, at most {MAX_COMMAND_BYTES})"
        try:
            change = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            return f"not valid JSON: {exc}"
        try:
            # Blocking (persists state/runtime.json), but small and rare; listeners such as the
            # detector expect to be called on the loop.
            self._runtime.apply(change)
        except RuntimeChangeError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot save the change: {exc}"
        return None

    def _on_settings_changed(self, settings: AgentSettings) -> None:
        # Runtime listeners may be called from any thread.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_settings_changed)

    def _async_settings_changed(self) -> None:
        self._last_error = None
        if self._conn is not None:
            payload = _json(self._config_message())
            self._publish(self._conn, self.topics.config, payload, qos=1, retain=True)

    # -- helpers --------------------------------------------------------------------------------

    def _publish(
        self,
        conn: Connection,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> None:
        """Fire and forget (state, not events): a failure is logged, never raised."""
        future = conn.publish(topic, payload, qos, correlation_data=correlation_data, retain=retain)
        future.add_done_callback(functools.partial(_log_failure, topic))


def _json(message: BaseModel) -> bytes:
    return message.model_dump_json().encode("utf-8")


def _log_failure(topic: str, future: asyncio.Future[None]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if isinstance(exc, MqttPublishRefusedError):
        logger.warning("MQTT: the broker refused a message on %s: %s", topic, exc)
    elif exc is not None:
        logger.debug("MQTT: message on %s not delivered: %s", topic, exc)
