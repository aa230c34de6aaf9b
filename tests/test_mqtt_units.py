"""Pure parts of the MQTT side: topics, backoff, payload models, discovery, runtime view, and
the error paths of the bridge both sides share (no broker needed)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from controller.errors import ControllerError
from controller.mqtt import Connection as ControllerConnection
from controller.settings import ControllerMqttSettings
from edge.discovery import discovery_messages
from edge.errors import SoundedgeError
from edge.messages.common import EventFile, EventRecord
from edge.messages.mqtt import (
    EventEndMessage,
    EventStartMessage,
    HealthMessage,
    parse_event_message,
)
from edge.mqtt import runtime_view
from edge.mqtt_client import (
    STABLE_SESSION_S,
    Backoff,
    Connection,
    MqttBridge,
    backoff_delay,
    run_until,
)
from edge.runtime import RuntimeConfig
from edge.settings import DEVICE_ID_PATTERN, AgentSettings, MqttSettings
from edge.topics import KINDS, DeviceTopics, fleet_filter, ha_config_topic, parse
from tests.fixtures.broker import free_port

device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)
prefixes = st.sampled_from(["soundedge", "site/a", "x"])


@given(prefixes, device_ids, st.sampled_from(KINDS))
def test_topics_parse_back_to_device_and_kind(prefix: str, device_id: str, kind: str) -> None:
    topics = DeviceTopics(prefix, device_id)
    assert parse(prefix, topics.of(kind)) == (device_id, kind)  # type: ignore[arg-type]


def test_parse_refuses_foreign_topics() -> None:
    assert parse("soundedge", "soundedge/pi/unknown") is None
    assert parse("soundedge", "other/pi/event") is None
    assert parse("soundedge", "soundedge/pi/reply/x") is None
    assert parse("soundedge", "soundedge//event") is None
    assert fleet_filter("soundedge", "event") == "soundedge/+/event"
    assert ha_config_topic("homeassistant", "switch", "pi", "detection") == (
        "homeassistant/switch/pi/detection/config"
    )


@given(st.integers(0, 100), st.floats(0.01, 10), st.floats(0.01, 600), st.integers(0, 2**32))
def test_backoff_is_capped_and_jittered(attempt: int, low: float, high: float, seed: int) -> None:
    high = max(low, high)
    delay = backoff_delay(attempt, low, high, random.Random(seed))
    cap = min(high, low * 2.0**attempt)
    assert cap / 2 <= delay <= cap


def test_backoff_grows_with_each_failure_until_a_session_lasts() -> None:
    backoff = Backoff(1.0, 60.0, random.Random(7))

    def within(delay: float, cap: float) -> bool:
        return cap / 2 <= delay <= cap

    assert within(backoff.connect_failed(), 1.0)
    assert within(backoff.connect_failed(), 2.0)
    # A session that ended before it lasted counts as one more failure.
    assert within(backoff.session_ended(STABLE_SESSION_S / 2), 4.0)
    assert within(backoff.session_ended(STABLE_SESSION_S), 1.0)  # it lasted: start again
    assert within(backoff.connect_failed(), 2.0)
    # The broker refused what was sent: the longest wait, even after a long session.
    assert within(backoff.session_ended(3600.0, refused=True), 60.0)


SIDES = ["agent", "controller"]


def connection(side: str, **settings: Any) -> MqttBridge[Any]:
    """The agent's or the controller's connection (both an `MqttBridge`)."""
    loop = asyncio.get_running_loop()
    if side == "agent":
        return Connection(MqttSettings(**settings), "t-agent", ("t/status", "offline"), loop)
    return ControllerConnection(
        ControllerMqttSettings(**settings), "t-controller", loop, persistent=True
    )


@pytest.mark.parametrize("side", SIDES)
async def test_unreadable_certificates_name_the_settings_of_each_side(
    side: str, tmp_path: Path
) -> None:
    prefix = {"agent": "SOUNDEDGE_MQTT__", "controller": "SOUNDEDGE_CONTROLLER_MQTT__"}[side]
    root = {"agent": SoundedgeError, "controller": ControllerError}[side]
    with pytest.raises(root, match=f"^{prefix}TLS_\\*: cannot load certificates: ") as caught:
        connection(side, tls=True, tls_ca_file=tmp_path / "absent.crt")
    assert type(caught.value).__name__ == "MqttError"


@pytest.mark.parametrize("side", SIDES)
async def test_a_broker_that_is_not_there_is_one_error_of_each_side(side: str) -> None:
    port = free_port()
    conn = connection(side, host="127.0.0.1", port=port)
    root = {"agent": SoundedgeError, "controller": ControllerError}[side]
    with pytest.raises(root, match=f"^cannot connect to 127.0.0.1:{port}: "):
        await conn.open(5.0)
    await conn.close()
    assert not conn.closed.is_set()


async def test_run_until_returns_the_result_or_none_once_an_event_is_set() -> None:
    stop, other = asyncio.Event(), asyncio.Event()
    assert await run_until(asyncio.sleep(0, "done"), stop, other) == "done"
    cancelled = asyncio.Event()

    async def forever() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return "never"

    asyncio.get_running_loop().call_later(0.01, other.set)
    async with asyncio.timeout(5):
        assert await run_until(forever(), stop, other) is None
    assert cancelled.is_set()  # and waited for

    async def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await run_until(failing(), stop)


async def test_run_until_cancels_what_it_runs_when_cancelled_itself() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    outer = asyncio.create_task(run_until(forever(), asyncio.Event()))
    async with asyncio.timeout(5):
        await started.wait()
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
    assert cancelled.is_set()


def record(seq: int = 7) -> EventRecord:
    onset = datetime(2026, 11, 25, 12, 0, 0, 123000, tzinfo=UTC)
    return EventRecord(
        event_id=uuid.uuid4().hex, seq=seq, device_id="pi", onset_time=onset,
        offset_time=onset + timedelta(seconds=1), duration_s=1.0,
        file_start_time=onset - timedelta(seconds=2), pre_roll_s=2.0, post_roll_s=2.0,
        peak_dbfs=-6.0, noise_floor_dbfs=-60.0,
        file=EventFile(name="pi_x_000007.wav", size_bytes=10, sha256="0" * 64, format="wav",
                       duration_s=5.0, samplerate=48000, channels=1),
    )  # fmt: skip


def test_end_message_round_trips_the_record() -> None:
    original = record()
    end = EventEndMessage.from_record(original, "ws://pi:8765")
    parsed = parse_event_message(end.model_dump_json())
    assert isinstance(parsed, EventEndMessage)
    assert parsed.to_record() == original
    wire = json.loads(end.model_dump_json())
    assert wire["onset_time"] == "2026-11-25T12:00:00.123Z"
    assert wire["schema_version"] == 1
    assert wire["type"] == "end"


def test_event_messages_are_strict() -> None:
    start = EventStartMessage(
        event_id=uuid.uuid4().hex, seq=1, device_id="pi", onset_time=datetime.now(UTC),
        level_dbfs=None, noise_floor_dbfs=-50.0,
    )  # fmt: skip
    wire = json.loads(start.model_dump_json())
    assert isinstance(parse_event_message(json.dumps(wire)), EventStartMessage)
    for broken in (
        {**wire, "type": "middle"},
        {**wire, "extra": 1},
        {**wire, "seq": 0},
        {**wire, "event_id": "../../etc/passwd"},
        {**wire, "onset_time": "2026-11-25T12:00:00"},  # no time zone
    ):
        with pytest.raises(ValidationError):
            parse_event_message(json.dumps(broken))


def test_health_levels_are_null_not_infinite() -> None:
    fields = HealthMessage.model_fields
    assert fields["level_dbfs"].annotation == float | None
    assert "Infinity" not in HealthMessage.model_json_schema().__repr__()


def test_runtime_view_has_the_shape_set_accepts(tmp_path: object) -> None:
    settings = AgentSettings(device_id="pi", data_dir=tmp_path)  # type: ignore[arg-type]
    view = runtime_view(settings)
    assert set(view) == {"enabled", "detector", "recording", "mqtt"}
    assert set(view["mqtt"]) == {"health_interval_s", "level_interval_s"}
    # Sending the view back as a command is valid and changes nothing.
    runtime = RuntimeConfig(settings)
    assert runtime.apply(view) == settings


def test_discovery_declares_one_device_with_the_required_entities() -> None:
    messages = discovery_messages(DeviceTopics("soundedge", "pi"), "homeassistant")
    configs = {topic: json.loads(payload) for topic, payload in messages}
    assert set(configs) == {
        "homeassistant/sensor/pi/level/config",
        "homeassistant/sensor/pi/noise_floor/config",
        "homeassistant/binary_sensor/pi/sound_active/config",
        "homeassistant/event/pi/sound/config",
        "homeassistant/switch/pi/detection/config",
    }
    assert len({json.dumps(c["device"], sort_keys=True) for c in configs.values()}) == 1
    assert len({c["unique_id"] for c in configs.values()}) == 5
    switch = configs["homeassistant/switch/pi/detection/config"]
    assert switch["command_topic"] == "soundedge/pi/set"
    assert json.loads(switch["payload_off"]) == {"enabled": False}
    for config in configs.values():
        assert config["availability"][0]["topic"] == "soundedge/pi/status"
