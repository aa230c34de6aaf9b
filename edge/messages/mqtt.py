"""MQTT payloads: every JSON message on the agent's topics, defined once.

The agent builds them, the controller parses them. Each carries `schema_version`; event
messages carry a `type` discriminator (`start` / `end`). Levels are dBFS (dB SPL if a
calibration is set); a level that is not known yet (no audio) is null.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from edge.messages.common import (
    SCHEMA_VERSION,
    DeviceId,
    EventFile,
    EventId,
    EventRecord,
    UtcTime,
    WireModel,
)

Level = float | None  # dBFS; None while unknown (no audio yet)


class InfoMessage(WireModel):
    """`<prefix>/<id>/info`, retained, published at every connect."""

    schema_version: int = SCHEMA_VERSION
    device_id: DeviceId
    version: str = Field(description="soundedge version of the agent.")
    host: str = Field(description="Host name of the machine.")
    platform: str = Field(description="OS and machine, e.g. 'Linux-6.1-aarch64'.")
    ws_url: str = Field(description="Websocket URL where the controller fetches event files.")
    started_at: UtcTime = Field(description="When the agent started.")
    mqtt_protocol: Literal["5", "3.1.1"]
    audio: dict[str, Any] = Field(description="Audio settings (see AudioSettings).")
    detector: dict[str, Any] = Field(description="Detector settings in force.")
    recording: dict[str, Any] = Field(description="Recording settings in force.")


class HealthMessage(WireModel):
    """`<prefix>/<id>/health`, retained, every `health_interval_s` seconds."""

    schema_version: int = SCHEMA_VERSION
    device_id: DeviceId
    time: UtcTime
    uptime_s: float = Field(ge=0.0)
    enabled: bool = Field(description="Detection on (runtime setting `enabled`).")
    capture_state: str = Field(description="starting, running, waiting_for_device or stopped.")
    capture_error: str | None = None
    level_dbfs: Level = Field(description="Current level.")
    peak_dbfs: Level = Field(description="Peak level reported by the pipeline.")
    noise_floor_dbfs: Level = Field(description="Tracked noise floor.")
    event_active: bool
    overflows: int = Field(ge=0, description="Input overflows (lost audio blocks) since start.")
    stream_restarts: int = Field(ge=0)
    dead_input: str | None = Field(
        description="Dead-microphone flag: null, or why (silent, constant, clipped)."
    )
    events_today: int = Field(ge=0, description="Events with an onset today (UTC).")
    events_recorded: int = Field(ge=0, description="Events recorded since start.")
    last_event_seq: int = Field(ge=0, description="Highest seq in the event log.")
    outbox_depth: int = Field(
        ge=0, description="Event messages not yet acknowledged by the broker."
    )
    uncollected_events: int = Field(ge=0, description="Event files no controller has fetched yet.")
    files_deleted_collected: int = Field(
        default=0, ge=0, description="Collected event files deleted by retention (total)."
    )
    files_lost_uncollected: int = Field(
        default=0,
        ge=0,
        description="Event files deleted before any controller fetched them (total): the loss "
        "policy at work, above the hard disk limit or below the minimum free space.",
    )
    event_bytes: int = Field(ge=0, description="Bytes of event files on disk.")
    disk_free_bytes: int = Field(ge=0, description="Free bytes on the data disk.")
    cpu_percent: float | None = Field(
        description="CPU used by the agent since the last health message, % of one core."
    )
    load_1m: float | None = Field(description="System load average over 1 minute.")
    soc_temperature_c: float | None = Field(description="SoC temperature in °C (Pi), else null.")


class LevelMessage(WireModel):
    """`<prefix>/<id>/level`, not retained, QoS 0, every `level_interval_s` seconds."""

    schema_version: int = SCHEMA_VERSION
    device_id: DeviceId
    time: UtcTime
    level_dbfs: Level
    peak_dbfs: Level
    noise_floor_dbfs: Level
    event_active: bool


class EventStartMessage(WireModel):
    """`<prefix>/<id>/event` with type `start`: the detector fired (the file is being written)."""

    schema_version: int = SCHEMA_VERSION
    type: Literal["start"] = "start"
    event_id: EventId
    seq: int = Field(ge=1)
    device_id: DeviceId
    onset_time: UtcTime
    level_dbfs: Level
    noise_floor_dbfs: Level


class EventEndMessage(WireModel):
    """`<prefix>/<id>/event` with type `end`: the event's file is complete on disk.

    The fields of the event record, plus where to fetch the file (`ws_url`).
    """

    schema_version: int = SCHEMA_VERSION
    type: Literal["end"] = "end"
    event_id: EventId
    seq: int = Field(ge=1)
    device_id: DeviceId
    onset_time: UtcTime
    offset_time: UtcTime
    duration_s: float = Field(ge=0.0)
    file_start_time: UtcTime
    pre_roll_s: float = Field(ge=0.0)
    post_roll_s: float = Field(ge=0.0)
    peak_dbfs: float
    noise_floor_dbfs: float
    split: bool = False
    clock_uncertain: bool = False
    file: EventFile | None = Field(description="The file (name, size, sha256, ...); null if lost.")
    ws_url: str = Field(description="The agent's websocket URL: fetch the file there by event_id.")

    @classmethod
    def from_record(cls, record: EventRecord, ws_url: str) -> EventEndMessage:
        fields = record.model_dump(exclude={"schema_version"})
        return cls(ws_url=ws_url, **fields)

    def to_record(self) -> EventRecord:
        return EventRecord.model_validate(self.model_dump(exclude={"type", "ws_url"}))


EventMessage = Annotated[EventStartMessage | EventEndMessage, Field(discriminator="type")]
_EVENT_ADAPTER: TypeAdapter[EventStartMessage | EventEndMessage] = TypeAdapter(EventMessage)


def parse_event_message(payload: bytes | str) -> EventStartMessage | EventEndMessage:
    """Parse an `event` payload; raises pydantic.ValidationError if it is not one."""
    return _EVENT_ADAPTER.validate_json(payload)


class SetError(WireModel):
    """Why the last `set` command was refused (nothing was changed)."""

    message: str = Field(description="What was wrong, naming the key.")
    received_at: UtcTime
    command: str = Field(description="The start of the refused payload (at most 200 chars).")


class ConfigMessage(WireModel):
    """`<prefix>/<id>/config`, retained: the effective runtime settings after each change.

    `settings` has the shape `set` accepts, so a value can be copied from here into a command.
    """

    schema_version: int = SCHEMA_VERSION
    device_id: DeviceId
    time: UtcTime
    settings: dict[str, Any] = Field(description="Settings that `set` can change, in force.")
    overrides: dict[str, Any] = Field(description="What `set` changed (persisted on the agent).")
    error: SetError | None = Field(
        default=None, description="The last refused command without a response topic."
    )


class SetReply(WireModel):
    """Reply to a `set` sent with an MQTT 5 response topic (and correlation data, echoed)."""

    schema_version: int = SCHEMA_VERSION
    device_id: DeviceId
    ok: bool
    error: str | None = Field(default=None, description="Why it was refused; null if applied.")
    settings: dict[str, Any] = Field(description="The settings in force after the command.")
