"""MQTT topic names: the one place that builds them (the agent and the controller import it).

Layout, under the prefix (default `soundedge`) and the device id:
`<prefix>/<id>/status|info|health|level|event|set|config`, and `<prefix>/<id>/reply/<any>` for
replies to `set` when a controller asks for them on a topic the device's ACL lets it write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["status", "info", "health", "level", "event", "set", "config"]
KINDS: tuple[Kind, ...] = ("status", "info", "health", "level", "event", "set", "config")
REPLY = "reply"

# Availability payloads of `<prefix>/<id>/status` (plain text, retained).
STATUS_ONLINE = "online"
STATUS_STOPPED = "stopped"
STATUS_OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class DeviceTopics:
    """The topics of one device."""

    prefix: str
    device_id: str

    def of(self, kind: Kind) -> str:
        return f"{self.prefix}/{self.device_id}/{kind}"

    @property
    def status(self) -> str:
        return self.of("status")

    @property
    def info(self) -> str:
        return self.of("info")

    @property
    def health(self) -> str:
        return self.of("health")

    @property
    def level(self) -> str:
        return self.of("level")

    @property
    def event(self) -> str:
        return self.of("event")

    @property
    def set(self) -> str:
        return self.of("set")

    @property
    def config(self) -> str:
        return self.of("config")

    def reply(self, name: str) -> str:
        """A reply topic under the device's own tree (so the device ACL lets it answer)."""
        return f"{self.prefix}/{self.device_id}/{REPLY}/{name}"


def fleet_filter(prefix: str, kind: Kind | Literal["#"]) -> str:
    """A subscription filter for one kind of topic of every device, e.g. `soundedge/+/event`."""
    return f"{prefix}/+/{kind}"


def parse(prefix: str, topic: str) -> tuple[str, Kind] | None:
    """(device_id, kind) of a device topic under `prefix`, or None if it is not one."""
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) != len(head) + 2 or parts[: len(head)] != head:
        return None
    device_id, kind = parts[-2], parts[-1]
    for known in KINDS:
        if kind == known and device_id:
            return device_id, known
    return None


def ha_status_topic(discovery_prefix: str) -> str:
    """Home Assistant's birth/last-will topic (`online` when it (re)starts)."""
    return f"{discovery_prefix}/status"


def ha_config_topic(discovery_prefix: str, component: str, device_id: str, object_id: str) -> str:
    """A Home Assistant discovery topic; node id = device id, so an ACL can use `%u`."""
    return f"{discovery_prefix}/{component}/{device_id}/{object_id}/config"
