"""The fleet as seen over MQTT: every message on the subscribed topics is checked, stored in the
database and handed to the collector (finished events, devices coming online).

Bad input never stops the controller: a message on a topic that is not a device topic, a
payload that is not the schema, or one whose device id differs from its topic's is logged as
one line (naming the topic, what was wrong and the start of the payload) and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from pydantic import ValidationError

from controller.collector import Collector
from controller.db import Database, DatabaseError
from controller.mqtt import Connection, Message
from controller.settings import ControllerSettings
from edge.messages.mqtt import (
    ConfigMessage,
    EventEndMessage,
    HealthMessage,
    InfoMessage,
    parse_event_message,
)
from edge.topics import STATUS_OFFLINE, STATUS_ONLINE, STATUS_STOPPED, parse

logger = logging.getLogger(__name__)

PAYLOAD_ECHO_CHARS = 120
STATUSES = frozenset({STATUS_ONLINE, STATUS_STOPPED, STATUS_OFFLINE})


class BadMessageError(ValueError):
    """A message that is not what its topic promises."""


def _echo(payload: bytes) -> str:
    return repr(payload[:PAYLOAD_ECHO_CHARS].decode("utf-8", errors="replace"))


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


class Fleet:
    """Applies MQTT messages to the database and the collector; knows each device's URL."""

    def __init__(self, settings: ControllerSettings, db: Database, collector: Collector) -> None:
        self._prefix = settings.mqtt.topic_prefix
        self._overrides = settings.ws_urls
        self._db = db
        self._collector = collector
        self._urls: dict[str, str] = {}
        self.rejected = 0  # malformed or foreign messages dropped

    async def load(self) -> None:
        """The websocket URLs known from the last run (before any info message arrives)."""
        for device in await asyncio.to_thread(self._db.devices):
            if device.ws_url:
                self._urls[device.device_id] = device.ws_url

    def url_of(self, device_id: str) -> str | None:
        """The device's websocket URL: the configured override, else the one it announced."""
        return self._overrides.get(device_id) or self._urls.get(device_id)

    async def session(self, conn: Connection) -> None:
        """Handle the connection's messages in order, acknowledging each once handled."""
        while True:
            message = await conn.messages.get()
            try:
                await self.handle(message)
            except DatabaseError as exc:
                # E.g. its disk is full. The message is acknowledged anyway: what it said is
                # found again by the next catch-up of the device, and the controller goes on.
                logger.error("cannot record a message on %s: %s", message.topic, exc)
            finally:
                message.ack()

    async def handle(self, message: Message) -> None:
        parsed = parse(self._prefix, message.topic)
        if parsed is None:
            self._reject(message, "not a device topic under the prefix")
            return
        device_id, kind = parsed
        if not message.payload:
            return  # a retained message being cleared
        try:
            if kind == "status":
                await self._status(device_id, message.payload)
            elif kind == "event":
                await self._event(device_id, message.payload)
            elif kind in ("info", "health", "config"):
                await self._document(device_id, kind, message.payload)
        except ValidationError as exc:
            self._reject(message, _describe(exc))
        except (BadMessageError, UnicodeDecodeError) as exc:
            self._reject(message, str(exc))

    def _reject(self, message: Message, why: str) -> None:
        self.rejected += 1
        logger.warning(
            "ignoring a message on %s: %s; payload %s", message.topic, why, _echo(message.payload)
        )

    async def _status(self, device_id: str, payload: bytes) -> None:
        status = payload.decode("utf-8").strip()
        if status not in STATUSES:
            raise BadMessageError(f"unknown status (expected one of {', '.join(sorted(STATUSES))})")
        previous = await asyncio.to_thread(self._db.set_status, device_id, status)
        if status != previous:
            logger.info("%s is %s", device_id, status)
        self._collector.device_online(device_id, status == STATUS_ONLINE)

    async def _document(
        self, device_id: str, kind: Literal["info", "health", "config"], payload: bytes
    ) -> None:
        document: InfoMessage | HealthMessage | ConfigMessage
        if kind == "info":
            document = InfoMessage.model_validate_json(payload)
        elif kind == "health":
            document = HealthMessage.model_validate_json(payload)
        else:
            document = ConfigMessage.model_validate_json(payload)
        self._check_device(device_id, document.device_id)
        await asyncio.to_thread(
            self._db.set_document, device_id, kind, document.model_dump(mode="json")
        )
        if isinstance(document, InfoMessage):
            known = self._urls.get(device_id)
            self._urls[device_id] = document.ws_url
            if known != document.ws_url:
                # A new device, or it moved: now it can be caught up.
                self._collector.request_catch_up(device_id)

    async def _event(self, device_id: str, payload: bytes) -> None:
        message = parse_event_message(payload)
        self._check_device(device_id, message.device_id)
        if not isinstance(message, EventEndMessage):
            await asyncio.to_thread(
                self._db.record_start,
                device_id,
                message.event_id,
                message.seq,
                message.onset_time,
            )
            return
        record = message.to_record()
        if device_id not in self._urls and device_id not in self._overrides:
            self._urls[device_id] = message.ws_url
        state = await asyncio.to_thread(self._db.record_end, record)
        self._collector.event_finished(record, state)

    @staticmethod
    def _check_device(topic_device: str, payload_device: str) -> None:
        if topic_device != payload_device:
            raise BadMessageError(
                f"device_id {payload_device!r} in the payload differs from the topic's"
            )
