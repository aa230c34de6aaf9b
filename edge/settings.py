"""The agent's settings: one root `AgentSettings`, one nested section per component.

Sources, highest priority first: constructor arguments (CLI flags), environment variables
(`SOUNDEDGE_...`, nested with `__`), a `.env` file, an optional JSON config file
(`SOUNDEDGE_CONFIG_FILE` or `--config`), then the defaults declared here. Runtime changes made
through the MQTT `set` command are stored separately (see `edge.runtime`) and applied on top.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_origin

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from edge.errors import SettingsError

ENV_PREFIX = "SOUNDEDGE_"
CONFIG_FILE_ENV = "SOUNDEDGE_CONFIG_FILE"

# Device ids end up in MQTT topics, file names and URLs: keep them to a safe alphabet.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


# Marks a field typed `X | None`: an empty value (`VAR=`, as in the systemd env examples)
# means "not set", i.e. None, which every "(empty: ...)" description documents. Without it
# pydantic would turn "" into Path("."), an empty user name or a number error. Every optional
# field of both programs carries it (tests/test_settings_empty.py checks).
EMPTY_IS_NONE = BeforeValidator(_empty_is_none)


def _refuse_empty(value: object) -> object:
    if value == "":
        raise ValueError("must not be empty (leave it unset for the default)")
    return value


# Marks a path that has no "not set" meaning: pydantic would read "" as Path("."), the
# working directory, without a word.
NOT_EMPTY = BeforeValidator(_refuse_empty)


def _default_device_id() -> str:
    host = socket.gethostname().split(".")[0]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in host).strip("-_")
    return safe or "soundedge"


class AudioSettings(BaseModel):
    """The sound card and the ring of buffers that holds the most recent audio."""

    device: Annotated[str | None, EMPTY_IS_NONE] = Field(
        default=None,
        description="Input device: an index or part of its name (e.g. 'Play! 3'); the name is "
        "stable across reboots, the index is not. Empty: the system default input.",
    )
    samplerate: int = Field(default=48000, ge=8000, le=384000, description="Sample rate in Hz.")
    channels: int = Field(default=1, ge=1, le=32, description="Number of input channels.")
    blocksize: int = Field(
        default=1024,
        ge=64,
        le=65536,
        description="Frames per audio callback block (1024 frames = 21.3 ms at 48 kHz).",
    )
    latency: Literal["low", "high"] | float = Field(
        default="high",
        description="PortAudio input latency: 'low', 'high' or seconds. 'high' avoids overflows "
        "on a busy Raspberry Pi.",
    )
    ring_buffers: int = Field(
        # 5 s: the default 2 s pre-roll plus room for a pipeline that runs twice a second or
        # falls behind for a moment; each second of ring costs samplerate × channels × 4 bytes
        # of memory (188 KiB at 48 kHz mono). Raise it for a longer pre-roll.
        default=5,
        ge=2,
        le=10000,
        description="Number of buffers in the ring of recent audio.",
    )
    buffer_s: float = Field(
        default=1.0,
        gt=0.0,
        le=600.0,
        description="Seconds of audio per ring buffer; ring capacity = ring_buffers × buffer_s.",
    )
    dead_input_s: float = Field(
        default=10.0,
        gt=0.0,
        description="Seconds of all-zero, constant or clipped input before the input is flagged "
        "as dead (a broken microphone or cable).",
    )
    stall_timeout_s: float = Field(
        default=3.0,
        gt=0.0,
        description="Seconds without any audio block before the stream is considered lost and "
        "reopened.",
    )
    reopen_backoff_max_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Longest wait in seconds between attempts to (re)open the sound card.",
    )
    process_interval_s: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Seconds the pipeline waits between runs, batching blocks, which cuts the "
        "agent's CPU by more than half. A block clearly louder than the background wakes it "
        "at once, so `start` is not delayed for sudden sounds; quieter onsets (a narrow-band "
        "call in loud noise) may be reported up to this much later. 0 processes every block "
        "as it comes.",
    )
    paced: bool = Field(
        default=True,
        description="The device delivers audio in real time; false for unpaced test sources "
        "such as ALSA's file plugin.",
    )

    @property
    def ring_s(self) -> float:
        """Total seconds of audio the ring holds."""
        return self.ring_buffers * self.buffer_s


class DetectorSettings(BaseModel):
    """The sound event detector. All of these can be changed at run time."""

    frame_s: float = Field(
        default=0.01,
        ge=0.002,
        le=0.1,
        description="Analysis frame length in seconds, 0.002-0.1 (rounded to a multiple of "
        "32 samples at 48 kHz: 0.01 s is exactly 480 samples).",
    )
    threshold_db: float = Field(
        default=5.0,
        ge=0.0,
        le=80.0,
        description="An event starts when the level, broadband or in any octave band, rises "
        "this many dB (0-80) above what the background reaches there (its noise floor plus "
        "its own measured fluctuation).",
    )
    release_db: float = Field(
        default=2.5,
        ge=0.0,
        le=80.0,
        description="An event may end when the level falls below that same reference plus "
        "release_db, in dB (0-80; hysteresis, must not exceed threshold_db).",
    )
    min_level_dbfs: float = Field(
        default=-70.0,
        ge=-160.0,
        le=0.0,
        description="Absolute minimum broadband level for an event to start, in dBFS "
        "(-160-0; compared after calibration_db, so in dB SPL when that is set).",
    )
    min_event_s: float = Field(
        # 0: `start` goes out in the frame that triggers (MQTT latency target). Longer minimums
        # changed nothing on the benchmark scenes (F1 0.983 at 0 and at 0.03 s).
        default=0.0,
        ge=0.0,
        le=60.0,
        description="Shortest event in seconds (0-60); shorter sounds are dropped. 0: one "
        "frame above the threshold makes an event. The start is reported once an event has "
        "lasted this long (plus at most one frame), so raising it delays every start.",
    )
    hang_s: float = Field(
        default=0.3,
        ge=0.0,
        le=60.0,
        description="Hang time in seconds (0-60): gaps shorter than this merge into one "
        "event; the end is reported this long after the sound stops.",
    )
    max_event_s: float = Field(
        default=60.0,
        gt=0.0,
        le=3600.0,
        description="Longest event in seconds (0-3600, above 0); a longer sound is split "
        "into consecutive events.",
    )
    highpass_hz: Annotated[float | None, EMPTY_IS_NONE] = Field(
        default=100.0,
        ge=1.0,
        description="High-pass corner in Hz (at least 1; empty: off), 24 dB/octave below "
        "750 Hz: takes mains hum and wind rumble down (what is left of them is steady and "
        "goes into the noise floor).",
    )
    lowpass_hz: Annotated[float | None, EMPTY_IS_NONE] = Field(
        default=None,
        ge=1.0,
        description="Low-pass corner in Hz (at least 1; empty: off), 24 dB/octave below "
        "750 Hz, per octave band above.",
    )
    a_weighting: bool = Field(
        default=False, description="Apply A-weighting (IEC 61672) to the levels (true/false)."
    )
    calibration_db: float = Field(
        default=0.0,
        ge=-200.0,
        le=200.0,
        description="Calibration in dB (-200-200) added to every reported level to give dB "
        "SPL (0: levels stay in dBFS, where a full-scale sine is 0 dBFS).",
    )
    floor_window_s: float = Field(
        default=10.0,
        ge=0.5,
        le=3600.0,
        description="Noise floor memory in seconds (0.5-3600): a sound that lasts longer "
        "than about this is taken into the background. Drifts of a few dB per second are "
        "followed regardless.",
    )

    @model_validator(mode="after")
    def _release_below_threshold(self) -> DetectorSettings:
        if self.release_db > self.threshold_db:
            raise ValueError(
                f"release_db ({self.release_db}) must not exceed threshold_db ({self.threshold_db})"
            )
        if (
            self.highpass_hz is not None
            and self.lowpass_hz is not None
            and self.lowpass_hz <= self.highpass_hz
        ):
            raise ValueError("lowpass_hz must be above highpass_hz")
        if self.min_event_s > self.max_event_s:
            raise ValueError(
                f"min_event_s ({self.min_event_s}) must not exceed max_event_s ({self.max_event_s})"
            )
        return self


class RecordingSettings(BaseModel):
    """How each event is written to a file."""

    pre_roll_s: float = Field(
        default=2.0, ge=0.0, le=600.0, description="Seconds of audio kept before the onset."
    )
    post_roll_s: float = Field(
        default=2.0, ge=0.0, le=600.0, description="Seconds of audio kept after the offset."
    )
    format: Literal["wav", "flac"] = Field(default="wav", description="Event file format.")
    subtype: Literal["PCM_16", "PCM_24", "FLOAT"] = Field(
        default="PCM_16", description="Sample encoding (FLAC supports PCM_16 and PCM_24)."
    )

    @model_validator(mode="after")
    def _flac_subtype(self) -> RecordingSettings:
        if self.format == "flac" and self.subtype == "FLOAT":
            raise ValueError("FLAC cannot store FLOAT samples; use PCM_16 or PCM_24")
        return self


class StorageSettings(BaseModel):
    """Disk use of event files (retention)."""

    max_disk_mb: float = Field(
        default=2000.0,
        gt=0.0,
        description="Soft limit in MB for event files: above it collected files are deleted, "
        "oldest first.",
    )
    hard_max_disk_mb: Annotated[float | None, EMPTY_IS_NONE] = Field(
        default=None,
        gt=0.0,
        description="Hard limit in MB: above it even uncollected files are deleted, oldest "
        "first (empty: 1.5 × max_disk_mb).",
    )
    min_free_mb: float = Field(
        default=200.0,
        ge=0.0,
        description="Keep at least this many MB free on the data disk (deleting collected "
        "files first, then the oldest).",
    )
    event_log_keep_days: float = Field(
        default=7.0,
        ge=0.0,
        description="Days (by onset time) that an event's record stays in the event log and in "
        "memory after its file is gone (deleted by retention), so a controller can still list "
        "it. Events whose file is on disk are always kept, and so, while MQTT is enabled, are "
        "those whose MQTT 'end' is not acknowledged. Memory: about 0.45 kB per record.",
    )
    event_log_keep_events: int = Field(
        default=1000,
        ge=0,
        description="The newest this-many events keep their records whatever their age "
        "(whichever of this and event_log_keep_days keeps more).",
    )

    @property
    def hard_limit_mb(self) -> float:
        return (
            self.hard_max_disk_mb if self.hard_max_disk_mb is not None else self.max_disk_mb * 1.5
        )


class MqttSettings(BaseModel):
    """The MQTT broker connection."""

    enabled: bool = Field(default=True, description="Publish to an MQTT broker.")
    host: str = Field(default="localhost", min_length=1, description="Broker host name or IP.")
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker TCP port (usually 1883; 8883 for TLS)."
    )
    username: Annotated[str | None, EMPTY_IS_NONE] = Field(
        default=None,
        description="User name (empty: anonymous). With the ACL in mosquitto/ it must be the "
        "device id.",
    )
    password: Annotated[SecretStr | None, EMPTY_IS_NONE] = Field(
        default=None, description="Password of `username`."
    )
    topic_prefix: str = Field(
        default="soundedge",
        pattern=r"^[^#+\s][^#+\s]*$",
        description="First level of every topic; no '#', '+' or spaces.",
    )
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version.")
    client_id: Annotated[str | None, EMPTY_IS_NONE] = Field(
        default=None, description="MQTT client id (empty: 'soundedge-<device_id>')."
    )
    keepalive_s: int = Field(
        default=30,
        ge=5,
        le=3600,
        description="Keepalive in seconds; the broker publishes the last will ('offline') after "
        "1.5 × this without traffic.",
    )
    tls: bool = Field(
        default=False,
        description="Connect with TLS; the server certificate and host name are verified unless "
        "tls_insecure.",
    )
    tls_ca_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None, description="CA certificate file (empty: the system's CAs)."
    )
    tls_cert_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None, description="Client certificate file (PEM), for brokers that require one."
    )
    tls_key_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None,
        description="Private key of the client certificate (PEM; empty: in the certificate file).",
    )
    tls_insecure: bool = Field(
        default=False, description="Skip certificate verification (testing only)."
    )
    reconnect_min_s: float = Field(
        default=1.0,
        gt=0.0,
        description="First reconnect delay in seconds; it doubles per failed attempt, with jitter.",
    )
    reconnect_max_s: float = Field(
        default=60.0, gt=0.0, description="Longest reconnect delay in seconds."
    )
    health_interval_s: float = Field(
        default=30.0, ge=1.0, description="Seconds between retained health messages."
    )
    level_interval_s: float = Field(
        default=10.0, ge=0.0, description="Seconds between level messages (0: off)."
    )
    discovery: bool = Field(default=True, description="Publish Home Assistant discovery.")
    discovery_prefix: str = Field(
        default="homeassistant",
        pattern=r"^[^#+\s][^#+\s]*$",
        description="Home Assistant discovery topic prefix; no '#', '+' or spaces.",
    )

    @model_validator(mode="after")
    def _backoff_range(self) -> MqttSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must not be below reconnect_min_s "
                f"({self.reconnect_min_s})"
            )
        return self


class WsSettings(BaseModel):
    """The websocket server through which controllers collect event files."""

    enabled: bool = Field(default=True, description="Run the websocket server.")
    host: str = Field(default="0.0.0.0", min_length=1, description="Address to listen on.")
    port: int = Field(default=8765, ge=0, le=65535, description="TCP port (0: any free port).")
    token: Annotated[SecretStr | None, EMPTY_IS_NONE] = Field(
        default=None,
        description="Bearer token clients must present; empty refuses every client.",
    )
    public_url: Annotated[str | None, EMPTY_IS_NONE] = Field(
        default=None,
        description="URL announced in MQTT info (empty: ws://<host name>:<port>).",
    )
    max_clients: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Authenticated websocket connections at most (count); up to 4 more may "
        "wait to give their token in hello.",
    )
    chunk_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Bytes per binary frame of a file transfer (256 KiB by default).",
    )
    sendfile: bool = Field(
        default=True,
        description=(
            "On plain ws://, send file chunks with sendfile(2), from the page cache to the "
            "socket (false: read them through Python, as over wss://)."
        ),
    )
    tls_cert_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None, description="PEM certificate (chain) file; with tls_key_file: serve wss://."
    )
    tls_key_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None, description="PEM private key file of tls_cert_file."
    )
    hello_timeout_s: float = Field(
        default=5.0,
        gt=0.0,
        le=300.0,
        description="Seconds a new connection has to send `hello` before it is closed.",
    )
    ping_interval_s: float = Field(
        default=20.0,
        gt=0.0,
        le=3600.0,
        description="Seconds between keepalive pings to each client.",
    )
    ping_timeout_s: float = Field(
        default=20.0,
        gt=0.0,
        le=3600.0,
        description="Seconds without a pong before a client is considered gone and dropped.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> WsSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self


def ring_problem(audio: AudioSettings, recording: RecordingSettings) -> str | None:
    """Why the ring of recent audio is too short for these settings, or None.

    The pre-roll is read from the ring when an event starts, and the pipeline may leave a
    batch of blocks in it for `process_interval_s`: both must fit with room to spare.
    """
    ring = (
        f"the ring (SOUNDEDGE_AUDIO__RING_BUFFERS × SOUNDEDGE_AUDIO__BUFFER_S = {audio.ring_s:g} s)"
    )
    if recording.pre_roll_s >= audio.ring_s:
        return (
            f"SOUNDEDGE_RECORDING__PRE_ROLL_S ({recording.pre_roll_s:g} s) must be shorter "
            f"than {ring}"
        )
    if audio.process_interval_s * 4 > audio.ring_s:
        return (
            f"SOUNDEDGE_AUDIO__PROCESS_INTERVAL_S ({audio.process_interval_s:g} s) must be at most "
            f"a quarter of {ring}"
        )
    return None


def _find_config_file(init_kwargs: dict[str, Any]) -> Path | None:
    explicit = init_kwargs.get("config_file") or os.environ.get(CONFIG_FILE_ENV)
    return Path(explicit) if explicit else None


class AgentSettings(BaseSettings):
    """Root settings of the edge agent (`soundedge`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    config_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None,
        description="JSON file with settings (environment variables override it).",
    )
    device_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)] = Field(
        default_factory=_default_device_id,
        description="This agent's id in topics and file names (empty: the host name).",
    )
    data_dir: Annotated[Path, NOT_EMPTY] = Field(
        default=Path("soundedge-data"),
        description="Directory for event files, the event log, the outbox and runtime state.",
    )
    enabled: bool = Field(default=True, description="Detect and record events.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    audio: AudioSettings = Field(default_factory=AudioSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    ws: WsSettings = Field(default_factory=WsSettings)

    @field_validator("device_id", mode="before")
    @classmethod
    def _empty_is_the_host_name(cls, value: object) -> object:
        # As the controller's controller_id: `SOUNDEDGE_DEVICE_ID=` (the env example's blank
        # line, uncommented) means the documented default, not an invalid id.
        return _default_device_id() if value == "" else value

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _ring_holds_what_is_asked_of_it(self) -> AgentSettings:
        if problem := ring_problem(self.audio, self.recording):
            raise ValueError(problem)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        config_path = _find_config_file(init_kwargs)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if config_path is not None:
            sources.append(JsonConfigSettingsSource(settings_cls, json_file=config_path))
        sources.append(file_secret_settings)
        return tuple(sources)


def env_name(loc: tuple[int | str, ...], prefix: str = ENV_PREFIX) -> str:
    """The environment variable that sets the field at `loc` (e.g. SOUNDEDGE_AUDIO__SAMPLERATE)."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    # Validators of a whole section report the section itself; name its variables' prefix.
    return prefix + "__".join(p.upper() for p in parts)


def _field_loc(loc: tuple[int | str, ...], root: type[BaseModel]) -> tuple[int | str, ...]:
    """The part of an error location that names fields, without what pydantic appends for
    a union member (`latency` -> "literal['low','high']", "float") or a mapping key."""
    names: list[int | str] = []
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        names.append(part)
        annotation = model.model_fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return tuple(names)


def describe_validation_error(
    exc: ValidationError,
    prefix: str = ENV_PREFIX,
    root: type[BaseModel] | None = None,
    config: tuple[Path, dict[str, Any]] | None = None,
) -> str:
    """One line naming each environment variable at fault and what is allowed. With `root`
    (the settings class), the alternatives of a union are told as one problem of one variable.
    With `config` (the config file and its content), a value that came from the file is named
    as the file's key."""
    # variable (or, for a rule across sections, its message) -> (problems, the value shown)
    problems: dict[str, tuple[list[str], str]] = {}
    for err in exc.errors():
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {str(value)[:60]!r})"
        message = err["msg"].removeprefix("Value error, ")
        loc = _field_loc(err["loc"], root) if root is not None else err["loc"]
        if not loc:  # a rule across sections names its variables itself
            problems.setdefault(message, ([], ""))
            continue
        name = env_name(loc, prefix)
        if config is not None and _from_config_file(name, loc, config[1]):
            name = f"{'.'.join(str(part) for part in loc)} in {config[0]}"
        messages, _ = problems.setdefault(name, ([], shown))
        if message not in messages:
            messages.append(message)
    return "; ".join(
        f"{key}: {'; or: '.join(messages)}{shown}" if messages else key
        for key, (messages, shown) in problems.items()
    )


def _from_config_file(variable: str, loc: tuple[int | str, ...], content: dict[str, Any]) -> bool:
    """Whether the value at `loc` came from the config file: the file has it and neither the
    environment nor the .env file (which override the file) sets `variable`."""
    node: Any = content
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    if variable in os.environ:
        return False
    dotenv = Path(".env")
    return not (dotenv.is_file() and variable in dotenv_values(dotenv))


# pydantic-settings names the field and the source, not the variable: 'error parsing value for
# field "audio" from source "EnvSettingsSource"'.
_SOURCE_ERROR = re.compile(r'field "(?P<field>[^"]+)" from source "(?P<source>[^"]+)"')


def describe_source_error(
    exc: PydanticSettingsError, root: type[BaseModel], prefix: str = ENV_PREFIX
) -> str:
    """One line for a variable that pydantic-settings could not decode before validation: one
    that holds JSON (a whole section such as SOUNDEDGE_AUDIO, or a mapping) but is not JSON.
    The value itself is not shown (it may hold tokens)."""
    match = _SOURCE_ERROR.search(str(exc))
    if match is None:  # not a format we know: still one line, without pydantic's newlines
        return f"{prefix}*: " + " ".join(str(exc).split())[:200]
    name = match["field"]
    variable = prefix + name.upper()
    where = " (in the .env file)" if match["source"].startswith("DotEnv") else ""
    field = root.model_fields.get(name)
    annotation = field.annotation if field is not None else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        allowed = (
            f"a JSON object of the section's settings (or leave it unset and set them one by "
            f"one as {variable}__<NAME>)"
        )
    else:
        allowed = "a JSON object" if get_origin(annotation) is dict else "JSON"
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        problem = "is empty" if not cause.doc.strip() else f"is not valid JSON ({cause})"
    else:
        problem = "cannot be read" + (f" ({' '.join(str(cause).split())[:120]})" if cause else "")
    return f"{variable}{where}: {problem}; it must be {allowed}"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def build_settings(
    settings_cls: type[SettingsT],
    prefix: str,
    error: type[Exception],
    overrides: dict[str, Any],
    config: tuple[Path, dict[str, Any]] | None = None,
) -> SettingsT:
    """Load `settings_cls` from its sources, for both programs: any invalid value, from the
    environment, a .env file or a config file, raises `error` with one line naming the
    variable (or the config file's key) and what is allowed (the command lines turn it into
    exit status 2)."""
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        raise error(describe_validation_error(exc, prefix, settings_cls, config)) from exc
    except PydanticSettingsError as exc:
        raise error(describe_source_error(exc, settings_cls, prefix)) from exc


def load_settings(**overrides: Any) -> AgentSettings:
    """Load and validate the agent's settings; raise `SettingsError` with a one-line message."""
    config_path = _find_config_file(overrides)
    config = None if config_path is None else (config_path, _check_config_file(config_path))
    return build_settings(AgentSettings, ENV_PREFIX, SettingsError, overrides, config)


def _check_config_file(path: Path) -> dict[str, Any]:
    """The config file's content; a clear error if it is missing or malformed (pydantic would
    say little)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SettingsError(f"{CONFIG_FILE_ENV}: config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{CONFIG_FILE_ENV}: cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{CONFIG_FILE_ENV}: {path} is not valid JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise SettingsError(f"{CONFIG_FILE_ENV}: {path} must hold a JSON object")
    return content


def masked_dump(settings: BaseSettings | BaseModel) -> dict[str, Any]:
    """The settings as JSON-ready data with secrets replaced by '**********'."""
    return settings.model_dump(mode="json")
