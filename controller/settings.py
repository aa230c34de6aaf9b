"""The controller's settings: one root `ControllerSettings`, nested sections per component.

Sources, highest priority first: constructor arguments (CLI flags), environment variables
(`SOUNDEDGE_CONTROLLER_...`, nested with `__`), a `.env` file, then the defaults declared here.
Errors are reported with the same one-line messages as the agent's (`edge.settings`).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from controller.errors import ControllerError
from edge.settings import DEVICE_ID_PATTERN, EMPTY_IS_NONE, NOT_EMPTY, build_settings

ENV_PREFIX = "SOUNDEDGE_CONTROLLER_"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class ControllerSettingsError(ControllerError):
    """A controller setting (environment variable or CLI flag) has an invalid value."""


def _default_controller_id() -> str:
    host = socket.gethostname().split(".")[0]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in host).strip("-_")
    return f"controller-{safe}" if safe else "controller"


class ControllerMqttSettings(BaseModel):
    """The MQTT broker connection of the controller."""

    host: str = Field(default="localhost", min_length=1, description="Broker host name or IP.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port.")
    username: Annotated[str | None, EMPTY_IS_NONE] = Field(
        default=None, description="User name (empty: anonymous)."
    )
    password: Annotated[SecretStr | None, EMPTY_IS_NONE] = Field(
        default=None, description="Password."
    )
    topic_prefix: str = Field(
        default="soundedge",
        pattern=r"^[^#+\s$][^#+\s]*$",
        description="First level of every topic (the agents' SOUNDEDGE_MQTT__TOPIC_PREFIX).",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        default="5",
        description="MQTT protocol version; shared subscriptions and `set` replies need 5.",
    )
    client_id: Annotated[str | None, EMPTY_IS_NONE] = Field(
        default=None,
        pattern=CLIENT_ID_PATTERN,
        description="MQTT client id (empty: the controller id). Must be unique on the broker.",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="Keepalive in seconds.")
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="Seconds the broker keeps the session (and queues QoS 1 events) while the "
        "controller is away; 0: a clean session each time (events missed meanwhile are then "
        "fetched by catch-up only).",
    )
    shared_group: Annotated[str | None, EMPTY_IS_NONE] = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Share the event work with other controllers in this MQTT 5 shared "
        "subscription group (`$share/<group>/...`); they must share the archive directory. "
        "Empty: this controller takes every event.",
    )
    tls: bool = Field(default=False, description="Connect with TLS.")
    tls_ca_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None, description="CA certificate file (empty: the system's CAs)."
    )
    tls_cert_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None, description="Client certificate file."
    )
    tls_key_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None, description="Client private key file."
    )
    tls_insecure: bool = Field(
        default=False, description="Skip certificate verification (testing only)."
    )
    reconnect_min_s: float = Field(
        default=1.0, gt=0.0, description="First reconnect delay in seconds."
    )
    reconnect_max_s: float = Field(
        default=60.0, gt=0.0, description="Longest reconnect delay in seconds."
    )

    @model_validator(mode="after")
    def _shared_needs_v5(self) -> ControllerMqttSettings:
        if self.shared_group is not None and self.protocol != "5":
            raise ValueError("shared_group needs protocol 5 (shared subscriptions are MQTT 5)")
        return self


class CollectorSettings(BaseModel):
    """Downloads of event files: concurrency, retries, catch-up, the archive disk."""

    max_downloads: int = Field(
        default=8, ge=1, le=1000, description="Downloads in progress at once, all devices (count)."
    )
    max_downloads_per_device: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Downloads requested at once from one device over its websocket (count).",
    )
    retry_min_s: float = Field(
        default=1.0,
        gt=0.0,
        description="First delay in seconds before a failed download is retried.",
    )
    retry_max_s: float = Field(
        default=120.0, gt=0.0, description="Longest delay in seconds between retries."
    )
    max_attempts: int = Field(
        default=8,
        ge=1,
        description="Attempts per file before it is set aside as failed (count); failed files "
        "are tried again at the next catch-up of their device.",
    )
    catchup_interval_s: float = Field(
        default=600.0,
        ge=0.0,
        description="Seconds between periodic catch-ups of every online device, a safety net "
        "besides the ones at start, on reconnection and on a gap (0: off).",
    )
    min_free_mb: float = Field(
        default=100.0,
        ge=0.0,
        description="Free space in MB to keep on the archive disk; below it downloads wait.",
    )
    claim_timeout_s: float = Field(
        default=600.0,
        gt=0.0,
        description="Seconds after which another controller of the group may take over a "
        "download claimed by a controller that went away.",
    )
    open_timeout_s: float = Field(
        default=10.0, gt=0.0, description="Seconds to open a websocket session with an agent."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0.0, description="Seconds to wait for an agent's answer to a request."
    )
    idle_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="Seconds without file data before a download is abandoned (and retried).",
    )


class ControllerSettings(BaseSettings):
    """Root settings of the controller (`soundedge-controller`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    controller_id: str = Field(
        # None becomes controller-<host name> (see _default_id): a default that depends on
        # the machine would make the generated configuration reference differ per machine.
        default=None,  # type: ignore[assignment]
        pattern=CLIENT_ID_PATTERN,
        description="This controller's name: websocket client id, default MQTT client id, "
        "claims and sidecars (empty: controller-<host name>). Unique per instance.",
    )
    archive_dir: Annotated[Path, NOT_EMPTY] = Field(
        default=Path("soundedge-archive"),
        description="Archive root: files go to <archive_dir>/<device_id>/<YYYY-MM-DD>/.",
    )
    db_path: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        default=None,
        description="SQLite database of devices and events (empty: <archive_dir>/controller.db).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    ws_token: Annotated[SecretStr | None, EMPTY_IS_NONE] = Field(
        default=None, description="Bearer token presented to every agent's websocket."
    )
    ws_tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='JSON object of device id to token, overriding ws_token: {"pi1": "..."}.',
    )
    ws_urls: dict[str, str] = Field(
        default_factory=dict,
        description="JSON object of device id to websocket URL, overriding the URL the device "
        'announces in its info: {"pi1": "ws://10.0.0.5:8765"}.',
    )
    mqtt: ControllerMqttSettings = Field(default_factory=ControllerMqttSettings)
    collector: CollectorSettings = Field(default_factory=CollectorSettings)

    @field_validator("controller_id", mode="before")
    @classmethod
    def _default_id(cls, value: object) -> object:
        return _default_controller_id() if value in (None, "") else value

    @field_validator("archive_dir", "db_path")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("ws_tokens", "ws_urls")
    @classmethod
    def _device_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not re.match(DEVICE_ID_PATTERN, key):
                raise ValueError(f"{key[:40]!r} is not a device id")
        return value

    @property
    def database_path(self) -> Path:
        return self.db_path if self.db_path is not None else self.archive_dir / "controller.db"

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or self.controller_id

    def token_for(self, device_id: str) -> str | None:
        """The websocket token for `device_id`: its own, else the fleet's, else None."""
        token = self.ws_tokens.get(device_id, self.ws_token)
        return token.get_secret_value() if token is not None else None


def load_settings(**overrides: Any) -> ControllerSettings:
    """Load and validate; raise `ControllerSettingsError` with a one-line message."""
    return build_settings(ControllerSettings, ENV_PREFIX, ControllerSettingsError, overrides)
