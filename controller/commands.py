"""The controller's commands (`run`, `devices`, `events`, `fetch`, `tail`, `set`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError

from controller.archive import Archive
from controller.collector import Collector
from controller.db import Database, DeviceRow, EventRow
from controller.errors import ControllerError
from controller.mqtt import Connection, Message, connect_once
from controller.progress import Progress
from controller.service import Controller
from controller.settings import ControllerSettings
from edge.messages.common import EVENT_ID_PATTERN, DeviceId
from edge.messages.mqtt import ConfigMessage, EventEndMessage, SetReply, parse_event_message
from edge.timeutil import iso_utc, utc_now
from edge.topics import DeviceTopics, fleet_filter

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 3
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DEVICE_ID: TypeAdapter[str] = TypeAdapter(DeviceId)


class UsageError(ControllerError):
    """A command-line argument is not valid."""


async def dispatch(
    args: argparse.Namespace, settings: ControllerSettings, progress: Progress | None = None
) -> int:
    command: str = args.command
    if command == "run":
        return await run(settings, progress)
    if command == "devices":
        return await devices(settings)
    if command == "events":
        return await events(settings, args.device, parse_since(args.since), args.limit)
    if command == "fetch":
        return await fetch(settings, args.event_id)
    if command == "tail":
        return await tail(settings, args.device, args.json, args.count)
    if command == "set":
        change = parse_assignments(args.assignments)
        return await set_command(settings, args.device, change, args.timeout)
    raise UsageError(f"unknown command {command}")


# -- run ----------------------------------------------------------------------------------------


async def run(settings: ControllerSettings, progress: Progress | None = None) -> int:
    controller = Controller(settings, progress=progress)
    controller.install_signal_handlers()
    await controller.run()
    return EXIT_OK


# -- reading the database -------------------------------------------------------------------


def _open_db(settings: ControllerSettings) -> Database:
    if not settings.database_path.exists():
        raise ControllerError(
            f"no database at {settings.database_path}: run `soundedge-controller run` first "
            "(or set SOUNDEDGE_CONTROLLER_DB_PATH / _ARCHIVE_DIR)"
        )
    db = Database(settings.database_path)
    db.open()
    return db


def _level(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _gigabytes(value: object) -> str:
    return f"{value / 1e9:.1f} GB" if isinstance(value, int | float) else "-"


def _short_time(text: str | None) -> str:
    return text.replace("T", " ")[:19] if text else "-"


def device_rows(devices_: list[DeviceRow], db: Database) -> list[list[str]]:
    today = utc_now().strftime("%Y-%m-%d")
    rows = []
    for device in devices_:
        health = device.health or {}
        events_today = health.get("events_today")
        if not isinstance(events_today, int):
            events_today = db.count_archived_on(device.device_id, today)
        rows.append(
            [
                device.device_id,
                device.status or "-",
                _short_time(device.last_seen),
                _level(health.get("level_dbfs")),
                _level(health.get("noise_floor_dbfs")),
                str(events_today),
                _gigabytes(health.get("disk_free_bytes")),
                str(health.get("outbox_depth", "-")),
            ]
        )
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


async def devices(settings: ControllerSettings) -> int:
    db = await asyncio.to_thread(_open_db, settings)
    try:
        found = await asyncio.to_thread(db.devices)
        rows = await asyncio.to_thread(device_rows, found, db)
    finally:
        db.close()
    header = [
        "id", "status", "last seen (UTC)", "level dBFS", "noise floor", "events today",
        "disk free", "outbox depth",
    ]  # fmt: skip
    print(table(header, rows))
    return EXIT_OK


def parse_since(text: str | None) -> datetime | None:
    """An ISO 8601 time (UTC if no zone) or an age such as '30m', '2h', '7d'."""
    if text is None:
        return None
    age = _AGE.match(text.strip())
    if age:
        return utc_now() - timedelta(seconds=float(age.group(1)) * _AGE_UNITS[age.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(
            f"--since {text!r}: expected an ISO time (2026-11-25T12:00Z) or an age (2h)"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=utc_now().tzinfo)
    return moment


def event_rows(rows: list[EventRow]) -> list[list[str]]:
    out = []
    for row in rows:
        record = row.record
        out.append(
            [
                _short_time(row.onset_time),
                row.device_id,
                str(row.seq),
                row.event_id,
                f"{record.duration_s:.2f}" if record else "-",
                f"{record.peak_dbfs:.1f}" if record else "-",
                row.state,
                row.path or (row.last_error or "")[:60],
            ]
        )
    return out


async def events(
    settings: ControllerSettings, device: str | None, since: datetime | None, limit: int
) -> int:
    db = await asyncio.to_thread(_open_db, settings)
    try:
        found = await asyncio.to_thread(db.events, device, since, limit)
    finally:
        db.close()
    header = ["onset (UTC)", "device", "seq", "event id", "dur s", "peak", "state", "file"]
    print(table(header, event_rows(found)))
    return EXIT_OK


# -- fetch ------------------------------------------------------------------------------------


async def fetch(settings: ControllerSettings, event_id: str) -> int:
    if not re.match(EVENT_ID_PATTERN, event_id):
        raise UsageError(f"{event_id!r} is not an event id (32 hex digits)")
    db = await asyncio.to_thread(_open_db, settings)
    try:
        row = await asyncio.to_thread(db.event, event_id)
        if row is None or row.record is None:
            raise ControllerError(
                f"event {event_id} is not known (finished) to this controller; see `events`"
            )
        archive = Archive(
            settings.archive_dir,
            settings.controller_id,
            int(settings.collector.min_free_mb * 1e6),
            settings.collector.claim_timeout_s,
        )
        await asyncio.to_thread(archive.open)
        known = await asyncio.to_thread(db.devices)
        urls = {d.device_id: d.ws_url for d in known if d.ws_url}

        def url_of(device_id: str) -> str | None:
            return settings.ws_urls.get(device_id) or urls.get(device_id)

        collector = Collector(settings, db, archive, url_of)
        try:
            await collector.collect(row.record)
        finally:
            await collector.close_links()
            # Claims name this process (not only the controller id `run` shares): release
            # what is still held and stop refreshing.
            await asyncio.to_thread(archive.close)
        row = await asyncio.to_thread(db.event, event_id)
    finally:
        db.close()
    if row is not None and row.state == "archived" and row.path:
        print(row.path)
        return EXIT_OK
    error = row.last_error if row is not None else "unknown"
    print(f"soundedge-controller: could not fetch {event_id}: {error}", file=sys.stderr)
    return EXIT_FAILED


# -- tail ---------------------------------------------------------------------------------------


def _client_id(settings: ControllerSettings, purpose: str) -> str:
    return f"{settings.mqtt_client_id}-{purpose}-{os.getpid()}"[:64]


def describe_event(message: Any) -> str:
    if isinstance(message, EventEndMessage):
        file = message.file
        what = f"{file.name} {file.size_bytes} B" if file else "no file"
        return (
            f"{iso_utc(message.onset_time)} {message.device_id} end   seq {message.seq} "
            f"{message.event_id} {message.duration_s:.2f} s peak {message.peak_dbfs:.1f} {what}"
        )
    return (
        f"{iso_utc(message.onset_time)} {message.device_id} start seq {message.seq} "
        f"{message.event_id}"
    )


async def tail(
    settings: ControllerSettings, device: str | None, raw_json: bool, count: int | None
) -> int:
    prefix = settings.mqtt.topic_prefix
    topic = DeviceTopics(prefix, device).event if device else fleet_filter(prefix, "event")
    conn = await connect_once(settings.mqtt, _client_id(settings, "tail"), [topic])
    logger.info("listening for events on %s", topic)
    seen = 0
    try:
        while count is None or seen < count:
            message = await _next_message(conn)
            message.ack()
            try:
                parsed = parse_event_message(message.payload)
            except ValidationError as exc:
                logger.warning(
                    "ignoring a malformed event on %s: %s", message.topic, exc.errors()[:1]
                )
                continue
            print(message.payload.decode() if raw_json else describe_event(parsed), flush=True)
            seen += 1
    finally:
        await conn.close()
    return EXIT_OK


async def _next_message(conn: Connection, timeout_s: float | None = None) -> Message:
    """The next message, or MqttError if the connection drops first."""
    getter = asyncio.ensure_future(conn.messages.get())
    closed = asyncio.ensure_future(conn.closed.wait())
    try:
        done, _ = await asyncio.wait(
            {getter, closed}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        closed.cancel()
        if not getter.done():
            getter.cancel()
    if getter in done:
        return getter.result()
    if closed in done:
        raise ControllerError(f"MQTT connection lost ({conn.close_reason})")
    raise TimeoutError


# -- set ----------------------------------------------------------------------------------------


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """`detector.threshold_db=8 enabled=false` → {"detector": {"threshold_db": 8}, ...}.

    Values are JSON where they parse as JSON (numbers, true/false, null), else strings.
    """
    change: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"{item!r}: expected KEY=VALUE, e.g. detector.threshold_db=8")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node = change
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"{item!r}: {part} is set twice")
            node = child
        node[leaf] = value
    return change


async def set_command(
    settings: ControllerSettings, device: str, change: dict[str, Any], timeout_s: float
) -> int:
    try:
        _DEVICE_ID.validate_python(device)
    except ValidationError as exc:
        raise UsageError(f"{device!r} is not a device id") from exc
    topics = DeviceTopics(settings.mqtt.topic_prefix, device)
    payload = json.dumps(change).encode("utf-8")
    if settings.mqtt.protocol == "5":
        return await _set_with_reply(settings, topics, payload, timeout_s)
    return await _set_with_config(settings, topics, payload, timeout_s)


async def _set_with_reply(
    settings: ControllerSettings, topics: DeviceTopics, payload: bytes, timeout_s: float
) -> int:
    """MQTT 5: ask for the answer on a reply topic under the device (its ACL lets it write
    there), matched by correlation data."""
    reply_topic = topics.reply(f"{settings.controller_id}-{uuid.uuid4().hex[:12]}")
    correlation = uuid.uuid4().bytes
    conn = await connect_once(settings.mqtt, _client_id(settings, "set"), [reply_topic])
    try:
        async with asyncio.timeout(timeout_s):
            await conn.publish(topics.set, payload, 1, reply_topic, correlation)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                message = await _next_message(conn, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return _no_answer(topics, timeout_s)
            message.ack()
            if message.correlation_data != correlation:
                continue
            try:
                reply = SetReply.model_validate_json(message.payload)
            except ValidationError as exc:
                raise ControllerError(f"{topics.device_id}: unreadable reply: {exc}") from exc
            return _report(topics.device_id, reply.ok, reply.error, reply.settings)
    finally:
        await conn.close()


async def _set_with_config(
    settings: ControllerSettings, topics: DeviceTopics, payload: bytes, timeout_s: float
) -> int:
    """MQTT 3.1.1 has no reply topics: watch the device's `config` for the change or error."""
    conn = await connect_once(settings.mqtt, _client_id(settings, "set"), [topics.config])
    try:
        # Retained config arrives first; the answer to our command is a live (non-retained) one.
        async with asyncio.timeout(timeout_s):
            await conn.publish(topics.set, payload, 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                message = await _next_message(conn, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return _no_answer(topics, timeout_s)
            message.ack()
            if message.retain:
                continue
            try:
                config = ConfigMessage.model_validate_json(message.payload)
            except ValidationError:
                continue
            error = config.error
            if error is not None and payload.decode("utf-8", "replace").startswith(error.command):
                return _report(topics.device_id, False, error.message, config.settings)
            return _report(topics.device_id, True, None, config.settings)
    finally:
        await conn.close()


def _no_answer(topics: DeviceTopics, timeout_s: float) -> int:
    print(
        f"soundedge-controller: {topics.device_id} did not answer within {timeout_s:.0f} s "
        "(offline, or not subscribed to its set topic)",
        file=sys.stderr,
    )
    return EXIT_TIMEOUT


def _report(device: str, ok: bool, error: str | None, settings: dict[str, Any]) -> int:
    if ok:
        print(f"{device}: applied; settings now {json.dumps(settings, sort_keys=True)}")
        return EXIT_OK
    print(f"soundedge-controller: {device} refused the change: {error}", file=sys.stderr)
    return EXIT_FAILED
