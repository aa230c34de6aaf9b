"""Types shared by every channel: the event record, ids and time stamps."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer

from edge.timeutil import iso_utc

SCHEMA_VERSION = 1

FileFormat = Literal["wav", "flac"]

# Event ids are 32 lowercase hex digits (a uuid4). They name files on request, so they are
# validated before they get anywhere near the file system.
EVENT_ID_PATTERN = r"^[0-9a-f]{32}$"
EventId = Annotated[str, Field(pattern=EVENT_ID_PATTERN)]
DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


def _require_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("time must carry a time zone (UTC)")
    return moment


# Times are UTC ISO 8601 with milliseconds on the wire ('2026-11-25T12:13:14.123Z').
UtcTime = Annotated[
    datetime, AfterValidator(_require_utc), PlainSerializer(iso_utc, return_type=str)
]


class WireModel(BaseModel):
    """Base of every wire message: unknown fields are refused, values are not mutated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EventFile(WireModel):
    """The audio file of a finished event, as written on the agent's disk."""

    name: str = Field(
        description="File name (no directory), e.g. pi1_20261125T121314.123Z_000042.wav"
    )
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: FileFormat
    duration_s: float = Field(ge=0.0)
    samplerate: int = Field(gt=0)
    channels: int = Field(gt=0)


class EventRecord(WireModel):
    """A finished sound event: what the event log stores and what `end` and `list` carry."""

    schema_version: int = SCHEMA_VERSION
    event_id: EventId
    seq: int = Field(ge=1, description="Per-device sequence number, monotonic across restarts.")
    device_id: DeviceId
    onset_time: UtcTime = Field(description="Wall time of the detector's onset (no pre-roll).")
    offset_time: UtcTime = Field(description="Wall time of the detector's offset (no post-roll).")
    duration_s: float = Field(ge=0.0, description="offset - onset in seconds.")
    file_start_time: UtcTime = Field(description="Wall time of the file's first sample.")
    pre_roll_s: float = Field(ge=0.0, description="Seconds in the file before the onset.")
    post_roll_s: float = Field(ge=0.0, description="Seconds in the file after the offset.")
    peak_dbfs: float
    noise_floor_dbfs: float
    split: bool = Field(
        default=False, description="True if the sound went on past max_event_s and continues."
    )
    clock_uncertain: bool = Field(
        default=False, description="The wall clock jumped while the event was being recorded."
    )
    file: EventFile | None = Field(default=None, description="None if the file was lost.")
