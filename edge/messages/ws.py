"""Websocket frames between the agent (server) and a controller (client), defined once.

Control messages are JSON text frames with a `type` discriminator; file data travels in binary
frames between a `file_start` and its `file_end`. `docs/websocket.md` describes the session; this
module is the schema both sides parse with. Any change to a message bumps `PROTOCOL_VERSION`:
the models refuse unknown fields, so a mismatch fails loudly instead of being half understood.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from edge.messages.common import (
    DeviceId,
    EventFile,
    EventId,
    EventRecord,
    FileFormat,
    UtcTime,
    WireModel,
)

PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOLS = frozenset({PROTOCOL_VERSION})

# A control message larger than this gets a `message_too_large` error and the connection lives
# on. Frames above `MAX_FRAME_BYTES` are refused by the websocket layer itself (close 1009),
# because the server never accepts binary data and has no reason to buffer more.
MAX_CONTROL_MESSAGE_BYTES = 16 * 1024
MAX_FRAME_BYTES = 64 * 1024
MAX_PAGE_SIZE = 1000

AUTH_SCHEME = "Bearer"
HEALTH_PATH = "/healthz"

RequestId = Annotated[
    str, Field(min_length=1, max_length=64, description="Chosen by the client, echoed back.")
]
ClientId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
DownloadMode = Literal["off", "pull", "push"]


class ErrorCode(StrEnum):
    """The `code` of an `error` message. Stable names: clients branch on them."""

    UNAUTHORIZED = "unauthorized"
    UNSUPPORTED_VERSION = "unsupported_version"
    HELLO_TIMEOUT = "hello_timeout"
    HELLO_REQUIRED = "hello_required"
    TOO_MANY_CLIENTS = "too_many_clients"
    MALFORMED_JSON = "malformed_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    MESSAGE_TOO_LARGE = "message_too_large"
    BINARY_NOT_ACCEPTED = "binary_not_accepted"
    NOT_ALLOWED = "not_allowed"
    TOO_MANY_REQUESTS = "too_many_requests"
    UNKNOWN_EVENT = "unknown_event"
    FILE_UNAVAILABLE = "file_unavailable"
    INVALID_OFFSET = "invalid_offset"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """Websocket close codes the agent uses (4000-4999 are the application's own range)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the agent is stopping
    MESSAGE_TOO_BIG = 1009  # a frame above MAX_FRAME_BYTES (sent by the websocket layer)
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # max_clients reached
    UNAUTHORIZED = 4001
    UNSUPPORTED_VERSION = 4002
    HELLO_TIMEOUT = 4003
    HANDSHAKE_FAILED = 4004  # the first message was not a valid `hello`


# -- client to server -----------------------------------------------------------------------


class ClientConfig(WireModel):
    """What the client wants from this session."""

    download_mode: DownloadMode = Field(
        description="off: notifications only; pull: the client asks with `get`; push: the agent "
        "also sends every new file as soon as it is complete."
    )
    formats: list[FileFormat] = Field(
        default_factory=lambda: list[FileFormat](["wav", "flac"]),
        min_length=1,
        max_length=8,
        description="File formats the client accepts; push skips the others.",
    )


class Hello(WireModel):
    """First message of a session."""

    type: Literal["hello"] = "hello"
    protocol: int = Field(description="Protocol version the client speaks.")
    client_id: ClientId
    token: str | None = Field(
        default=None,
        max_length=1024,
        repr=False,
        description="The device's token, if not sent in the Authorization header.",
    )
    config: ClientConfig


class ListRequest(WireModel):
    """Event metadata with seq > since_seq, in seq order, one page."""

    type: Literal["list"] = "list"
    request_id: RequestId
    since_seq: int = Field(default=0, ge=0)
    page_size: int = Field(default=100, ge=1, le=MAX_PAGE_SIZE)


class GetRequest(WireModel):
    """Send an event's file from byte `offset` (resume) to its end."""

    type: Literal["get"] = "get"
    request_id: RequestId
    event_id: EventId
    offset: int = Field(default=0, ge=0, description="First byte to send (bytes already held).")


class AckRequest(WireModel):
    """The client holds a verified copy: the agent may delete the file before others."""

    type: Literal["ack"] = "ack"
    request_id: RequestId
    event_id: EventId


ClientMessage = Annotated[
    Hello | ListRequest | GetRequest | AckRequest, Field(discriminator="type")
]
CLIENT_MESSAGE_TYPES = frozenset({"hello", "list", "get", "ack"})
client_message_adapter: TypeAdapter[Hello | ListRequest | GetRequest | AckRequest] = TypeAdapter(
    ClientMessage
)


# -- server to client -----------------------------------------------------------------------


class Welcome(WireModel):
    """Answer to a valid `hello`: the session is open."""

    type: Literal["welcome"] = "welcome"
    protocol: int
    device_id: DeviceId
    agent_version: str
    capabilities: list[str] = Field(description="Features of this agent, e.g. 'push', 'resume'.")
    config: ClientConfig = Field(description="The client configuration in force.")
    settings: dict[str, Any] = Field(description="The agent's effective settings, secrets masked.")
    newest_seq: int = Field(ge=0, description="seq of the newest finished event (0: none).")
    chunk_bytes: int = Field(gt=0, description="Largest binary frame of a transfer.")
    max_message_bytes: int = Field(gt=0, description="Largest control message accepted.")
    server_time: UtcTime


class EventsPage(WireModel):
    """One page of a `list`."""

    type: Literal["events"] = "events"
    request_id: RequestId
    events: list[EventRecord]
    more: bool = Field(description="More events follow; ask again with the last seq.")
    newest_seq: int = Field(ge=0)


class FileStart(WireModel):
    """A file transfer begins; binary frames follow until `file_end`."""

    type: Literal["file_start"] = "file_start"
    request_id: RequestId | None = Field(description="The `get` answered; None when pushed.")
    pushed: bool
    event_id: EventId
    seq: int = Field(ge=1)
    file: EventFile = Field(description="Name, total size and sha256 of the whole file.")
    offset: int = Field(ge=0, description="Byte of the file the first binary frame starts at.")
    chunk_bytes: int = Field(gt=0)


class FileEnd(WireModel):
    """All bytes from `offset` to the end of the file were sent."""

    type: Literal["file_end"] = "file_end"
    request_id: RequestId | None
    event_id: EventId
    bytes_sent: int = Field(ge=0)


class Acked(WireModel):
    """The event is marked collected."""

    type: Literal["acked"] = "acked"
    request_id: RequestId
    event_id: EventId


class EventNotice(WireModel):
    """An event started or finished (the same facts as the MQTT `event` topic)."""

    type: Literal["event"] = "event"
    kind: Literal["start", "end"]
    event_id: EventId
    seq: int = Field(ge=1)
    onset_time: UtcTime
    record: EventRecord | None = Field(description="The finished event (kind 'end' only).")


class ErrorMessage(WireModel):
    """A request or frame was refused; with `fatal` the server closes the connection next."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    request_id: RequestId | None = None
    fatal: bool = False


ServerMessage = Annotated[
    Welcome | EventsPage | FileStart | FileEnd | Acked | EventNotice | ErrorMessage,
    Field(discriminator="type"),
]
server_message_adapter: TypeAdapter[
    Welcome | EventsPage | FileStart | FileEnd | Acked | EventNotice | ErrorMessage
] = TypeAdapter(ServerMessage)
