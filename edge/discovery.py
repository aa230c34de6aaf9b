"""Home Assistant MQTT discovery: one device per agent, built from the agent's own topics.

Entities: availability (from `status`), sound level and noise floor sensors, a "sound active"
binary sensor and an `event` entity (both from `event`), and a switch for detection on/off
(command `{"enabled": ...}` on `set`, state from `config`). Discovery topics use the device id
as node id, so a broker ACL can allow a device its own `homeassistant/+/<id>/#` (see mosquitto/).
"""

from __future__ import annotations

import json
from typing import Any

from edge import __version__
from edge.topics import STATUS_ONLINE, DeviceTopics, ha_config_topic

# Every status other than `online` (`stopped`, `offline`) means unavailable to Home Assistant.
_AVAILABILITY_TEMPLATE = "{{ 'online' if value == 'online' else 'offline' }}"


def discovery_messages(topics: DeviceTopics, discovery_prefix: str) -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery config of this device, to publish retained."""
    device_id = topics.device_id
    device = {
        "identifiers": [f"soundedge_{device_id}"],
        "name": f"soundedge {device_id}",
        "manufacturer": "soundedge",
        "model": "sound event sensor",
        "sw_version": __version__,
    }
    common: dict[str, Any] = {
        "device": device,
        "availability": [
            {
                "topic": topics.status,
                "value_template": _AVAILABILITY_TEMPLATE,
                "payload_available": STATUS_ONLINE,
                "payload_not_available": "offline",
            }
        ],
        "origin": {"name": "soundedge", "sw": __version__},
    }
    entities: list[tuple[str, str, dict[str, Any]]] = [
        (
            "sensor",
            "level",
            {
                "name": "Sound level",
                "state_topic": topics.level,
                "value_template": "{{ value_json.level_dbfs }}",
                "unit_of_measurement": "dB",
                "state_class": "measurement",
                "icon": "mdi:volume-high",
            },
        ),
        (
            "sensor",
            "noise_floor",
            {
                "name": "Noise floor",
                "state_topic": topics.health,
                "value_template": "{{ value_json.noise_floor_dbfs }}",
                "unit_of_measurement": "dB",
                "state_class": "measurement",
                "icon": "mdi:waveform",
            },
        ),
        (
            "binary_sensor",
            "sound_active",
            {
                "name": "Sound active",
                "state_topic": topics.event,
                "value_template": "{{ 'ON' if value_json.type == 'start' else 'OFF' }}",
                "device_class": "sound",
            },
        ),
        (
            "event",
            "sound",
            {
                "name": "Sound event",
                "state_topic": topics.event,
                "event_types": ["start", "end"],
                # HA wants a JSON object with `event_type`; the rest become attributes.
                "value_template": (
                    "{{ {'event_type': value_json.type, 'event_id': value_json.event_id, "
                    "'seq': value_json.seq} | to_json }}"
                ),
            },
        ),
        (
            "switch",
            "detection",
            {
                "name": "Detection",
                "command_topic": topics.set,
                "payload_on": json.dumps({"enabled": True}),
                "payload_off": json.dumps({"enabled": False}),
                "state_topic": topics.config,
                "value_template": "{{ 'ON' if value_json.settings.enabled else 'OFF' }}",
                "state_on": "ON",
                "state_off": "OFF",
                "icon": "mdi:microphone",
            },
        ),
    ]
    messages = []
    for component, object_id, config in entities:
        payload = {
            **common,
            **config,
            "unique_id": f"soundedge_{device_id}_{object_id}",
            "object_id": f"soundedge_{device_id}_{object_id}",
        }
        topic = ha_config_topic(discovery_prefix, component, device_id, object_id)
        messages.append((topic, json.dumps(payload, separators=(",", ":")).encode("utf-8")))
    return messages
