"""The MQTT publisher against a real Mosquitto (the project's config), driven in-process with
a real event store, bus and runtime config: availability, info, health, events, commands."""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import json
import logging
import os
import sysconfig
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.mqtt import Connection as ControllerConnection
from controller.mqtt import MqttError as ControllerMqttError
from controller.settings import ControllerMqttSettings
from edge.bus import EventBus, EventFinished, EventStarted
from edge.messages.common import EventFile, EventRecord
from edge.messages.mqtt import (
    ConfigMessage,
    EventEndMessage,
    EventStartMessage,
    HealthMessage,
    InfoMessage,
    LevelMessage,
    SetReply,
    parse_event_message,
)
from edge.mqtt import MqttPublisher
from edge.mqtt_client import Connection, Incoming, MqttError, MqttPublishRefusedError
from edge.runtime import RuntimeConfig
from edge.settings import AgentSettings, MqttSettings
from edge.state import AgentState
from edge.store import EventStore
from edge.topics import DeviceTopics
from tests.fixtures.broker import Broker, MqttRecorder, Received, free_port

pytestmark = pytest.mark.system

WS_URL = "ws://dev-a.test:8765"
TOPICS = DeviceTopics("soundedge", "dev-a")
T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
# Debian's mosquitto package ships it.
DYNSEC_PLUGIN = (
    Path("/usr/lib") / sysconfig.get_config_var("MULTIARCH") / "mosquitto_dynamic_security.so"
)


def agent_settings(
    data_dir: Path, broker: Broker, user: str = "dev-a", **mqtt: Any
) -> AgentSettings:
    fields: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "username": user,
        "password": broker.users.get(user, "wrong"),
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "health_interval_s": 1.0,
        "level_interval_s": 1.0,
        **mqtt,
    }
    return AgentSettings(device_id=user, data_dir=data_dir, mqtt=MqttSettings(**fields))


@dataclass
class AgentUnderTest:
    """The publisher with the real parts it reads, as the agent wires them."""

    settings: AgentSettings
    runtime: RuntimeConfig
    store: EventStore
    bus: EventBus
    state: AgentState
    publisher: MqttPublisher
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None

    @classmethod
    def build(cls, settings: AgentSettings) -> AgentUnderTest:
        runtime = RuntimeConfig(settings)
        runtime.load()
        store = EventStore(settings.data_dir, settings.device_id, settings.storage)
        store.open()
        bus = EventBus()
        state = AgentState(level_dbfs=-42.0, peak_dbfs=-30.0, noise_floor_dbfs=-60.0)
        publisher = MqttPublisher(settings, runtime, store, bus, state, WS_URL)
        return cls(settings, runtime, store, bus, state, publisher, asyncio.Event())

    def start(self) -> None:
        self.task = asyncio.create_task(self.publisher.run(self.stop))

    async def stop_clean(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout_s)
        self.store.close()

    def emit(self, finish: bool = True) -> EventRecord:
        """An event as the pipeline reports it: `start` on the bus, then the finished record."""
        seq = self.store.reserve_seq()
        event_id = uuid.uuid4().hex
        onset = T0 + timedelta(seconds=seq)
        self.bus.publish(EventStarted(event_id, seq, onset, -20.0, -60.0))
        record = EventRecord(
            event_id=event_id,
            seq=seq,
            device_id=self.settings.device_id,
            onset_time=onset,
            offset_time=onset + timedelta(seconds=0.5),
            duration_s=0.5,
            file_start_time=onset - timedelta(seconds=2),
            pre_roll_s=2.0,
            post_roll_s=2.0,
            peak_dbfs=-12.0,
            noise_floor_dbfs=-60.0,
            file=EventFile(
                name=f"dev-a_{seq:06d}.wav",
                size_bytes=1000 + seq,
                sha256="ab" * 32,
                format="wav",
                duration_s=4.5,
                samplerate=48000,
                channels=1,
            ),
        )
        if finish:
            self.store.add(record, None)
            self.bus.publish(EventFinished(record))
        return record


@pytest.fixture
async def agent_a(tmp_path: Path, broker: Broker) -> AsyncIterator[AgentUnderTest]:
    agent = AgentUnderTest.build(agent_settings(tmp_path / "a", broker))
    yield agent
    if agent.task is not None and not agent.task.done():
        await agent.stop_clean()


async def wait_for(
    recorder: MqttRecorder, predicate: Callable[[list[Received]], bool], timeout_s: float = 30.0
) -> list[Received]:
    return await asyncio.to_thread(recorder.wait_for, predicate, timeout_s)


def on(topic: str) -> Callable[[list[Received]], bool]:
    return lambda messages: any(m.topic == topic for m in messages)


def events(messages: list[Received], topic: str, kind: str) -> list[dict[str, Any]]:
    found = [m.json() for m in messages if m.topic == topic]
    return [m for m in found if m["type"] == kind]


async def started_with_controller(
    agent: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder], watched: str
) -> MqttRecorder:
    """Start `agent` under the eyes of a controller that subscribed to `watched` and to its own
    `set` replies; return the controller once `watched` has arrived."""
    controller = recorder_factory()
    controller.connect()
    controller.subscribe(watched)
    controller.subscribe(TOPICS.reply("ctl"))
    agent.start()
    await wait_for(controller, on(watched))
    return controller


async def test_announces_state_and_events_with_valid_payloads(
    agent_a: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    watcher = recorder_factory()
    watcher.connect()
    watcher.subscribe("soundedge/dev-a/#")
    agent_a.start()
    await wait_for(watcher, lambda ms: all(on(t)(ms) for t in (TOPICS.status, TOPICS.info,
                                                               TOPICS.health, TOPICS.level,
                                                               TOPICS.config)))  # fmt: skip
    status = watcher.on(TOPICS.status)[0]
    assert status.payload == b"online"
    InfoMessage.model_validate_json(watcher.on(TOPICS.info)[0].payload)
    health = HealthMessage.model_validate_json(watcher.on(TOPICS.health)[0].payload)
    assert health.level_dbfs == -42.0
    assert health.outbox_depth == 0
    LevelMessage.model_validate_json(watcher.on(TOPICS.level)[0].payload)
    config = ConfigMessage.model_validate_json(watcher.on(TOPICS.config)[0].payload)
    assert config.settings["enabled"] is True

    records = [agent_a.emit() for _ in range(3)]
    messages = await wait_for(watcher, lambda ms: len(events(ms, TOPICS.event, "end")) == 3)
    event_messages = [m for m in messages if m.topic == TOPICS.event]
    assert not any(m.retain for m in event_messages)
    parsed = [parse_event_message(m.payload) for m in event_messages]
    starts = [p for p in parsed if isinstance(p, EventStartMessage)]
    ends = [p for p in parsed if isinstance(p, EventEndMessage)]
    assert [s.seq for s in starts] == [r.seq for r in records]
    assert [e.seq for e in ends] == [r.seq for r in records]
    for end, record in zip(ends, records, strict=True):
        assert end.to_record() == record
        assert end.ws_url == WS_URL
    # Each start comes before its own end.
    order = [(type(p).__name__, p.seq) for p in parsed]
    for record in records:
        assert order.index(("EventStartMessage", record.seq)) < order.index(
            ("EventEndMessage", record.seq)
        )

    # A retained `online` is what a late subscriber sees first.
    late = recorder_factory()
    late.connect()
    late.subscribe(TOPICS.status)
    retained = await wait_for(late, on(TOPICS.status))
    assert retained[0].retain
    assert retained[0].payload == b"online"

    await agent_a.stop_clean()
    final = await wait_for(late, lambda ms: ms[-1].payload == b"stopped")
    assert final[-1].topic == TOPICS.status


async def test_home_assistant_discovery_is_republished_when_ha_comes_online(
    agent_a: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    ha = recorder_factory("homeassistant")
    ha.connect()
    ha.subscribe("homeassistant/+/dev-a/+/config")
    agent_a.start()
    first = await wait_for(ha, lambda ms: len(ms) >= 5)
    components = {m.topic.split("/")[1] for m in first}
    assert components == {"sensor", "binary_sensor", "event", "switch"}
    for message in first:
        config = message.json()
        assert config["availability"][0]["topic"] == "soundedge/dev-a/status"
        assert config["device"]["identifiers"] == ["soundedge_dev-a"]
    count = len(first)
    ha.client.publish("homeassistant/status", b"online", qos=1).wait_for_publish(10)
    again = await wait_for(ha, lambda ms: len(ms) >= 2 * count)
    assert {m.topic for m in again[count:]} == {m.topic for m in first}


async def test_set_applies_valid_commands_and_persists_them(
    agent_a: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    controller = await started_with_controller(agent_a, recorder_factory, TOPICS.config)

    reply = await send_set(controller, TOPICS, {"detector": {"threshold_db": 12}}, "one")
    assert reply.ok, reply.error
    assert reply.settings["detector"]["threshold_db"] == 12
    assert agent_a.runtime.settings.detector.threshold_db == 12

    # Without a response topic (e.g. MQTT 3.1.1), the new config is the answer.
    config = await set_answered_on_config(
        controller, b'{"enabled": false}', lambda c: c["settings"]["enabled"] is False
    )
    assert config.error is None
    assert config.overrides == {"detector": {"threshold_db": 12}, "enabled": False}
    assert agent_a.runtime.settings.enabled is False

    # The changes survive a restart of the agent.
    await agent_a.stop_clean()
    reloaded = RuntimeConfig(agent_a.settings)
    reloaded.load()
    assert reloaded.settings.enabled is False
    assert reloaded.settings.detector.threshold_db == 12


async def send_set(
    controller: MqttRecorder, topics: DeviceTopics, change: Any, name: str
) -> SetReply:
    """Send `set` with an MQTT 5 response topic and correlation data; wait for the reply."""
    correlation = f"corr-{name}".encode()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topics.reply("ctl")
    props.CorrelationData = correlation
    payload = change if isinstance(change, bytes) else json.dumps(change).encode()
    controller.client.publish(topics.set, payload, qos=1, properties=props)

    def answered(messages: list[Received]) -> bool:
        return any(
            m.topic == topics.reply("ctl")
            and getattr(m.properties, "CorrelationData", None) == correlation
            for m in messages
        )

    messages = await wait_for(controller, answered)
    reply = next(
        m for m in messages if getattr(m.properties, "CorrelationData", None) == correlation
    )
    return SetReply.model_validate_json(reply.payload)


async def set_answered_on_config(
    controller: MqttRecorder, payload: bytes, answered: Callable[[dict[str, Any]], bool]
) -> ConfigMessage:
    """Send `set` without a response topic (as over MQTT 3.1.1); the answer is the newest
    `config` for which `answered` holds."""
    controller.client.publish(TOPICS.set, payload, qos=1)

    def answers(messages: list[Received]) -> list[Received]:
        return [m for m in messages if m.topic == TOPICS.config and answered(m.json())]

    messages = await wait_for(controller, lambda ms: bool(answers(ms)))
    return ConfigMessage.model_validate_json(answers(messages)[-1].payload)


INVALID_COMMANDS: list[tuple[str, bytes]] = [
    ("not-json", b"threshold=12"),
    ("not-utf8", b"\xff\xfe{"),
    ("not-an-object", b"[1, 2]"),
    ("empty-object", b"{}"),
    ("unknown-section", b'{"detectr": {"threshold_db": 12}}'),
    ("unknown-field", b'{"detector": {"threshold": 12}}'),
    ("not-changeable", b'{"mqtt": {"host": "evil.example"}}'),
    ("wrong-type", b'{"detector": {"threshold_db": "12"}}'),
    ("wrong-type-bool", b'{"enabled": "false"}'),
    ("section-not-object", b'{"detector": 12}'),
    ("out-of-range", b'{"detector": {"threshold_db": 500}}'),
    ("nan", b'{"detector": {"threshold_db": NaN}}'),
    ("inconsistent", b'{"detector": {"release_db": 70}}'),
    ("partly-valid", b'{"enabled": false, "detector": {"threshold_db": -1}}'),
]


async def test_invalid_set_payloads_change_nothing_and_get_an_error(
    agent_a: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    controller = await started_with_controller(agent_a, recorder_factory, TOPICS.config)
    before = agent_a.runtime.settings
    state_file = agent_a.settings.data_dir / "state" / "runtime.json"

    for name, payload in INVALID_COMMANDS:
        reply = await send_set(controller, TOPICS, payload, name)
        assert not reply.ok, name
        assert reply.error, name
        assert agent_a.runtime.settings == before, name
        assert agent_a.runtime.overrides == {}, name
        assert not state_file.exists(), name

    # Without a response topic the error lands on the retained config, naming the key.
    config = await set_answered_on_config(
        controller, b'{"detector": {"threshold_db": 500}}', lambda c: bool(c["error"])
    )
    assert config.error is not None
    assert "threshold_db" in config.error.message
    assert agent_a.runtime.settings == before


async def test_level_can_be_switched_off_at_run_time(
    agent_a: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    controller = await started_with_controller(agent_a, recorder_factory, TOPICS.level)
    reply = await send_set(controller, TOPICS, {"mqtt": {"level_interval_s": 0}}, "off")
    assert reply.ok, reply.error
    # Whatever was in flight has arrived once a health round trip later; then silence.
    await asyncio.sleep(1.5)
    count = len(controller.on(TOPICS.level))
    await asyncio.sleep(2.5)
    assert len(controller.on(TOPICS.level)) == count


async def test_mqtt_3_1_1_reports_events_and_set_errors_on_config(
    tmp_path: Path, broker: Broker, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    agent = AgentUnderTest.build(agent_settings(tmp_path / "a", broker, protocol="3.1.1"))
    controller = recorder_factory(protocol="3.1.1")
    controller.connect()
    controller.subscribe("soundedge/dev-a/#")
    agent.start()
    try:
        await wait_for(controller, lambda ms: any(m.payload == b"online" for m in ms))
        record = agent.emit()
        messages = await wait_for(controller, lambda ms: len(events(ms, TOPICS.event, "end")) == 1)
        assert events(messages, TOPICS.event, "end")[0]["event_id"] == record.event_id
        config = await set_answered_on_config(
            controller, b'{"enabled": "no"}', lambda c: bool(c["error"])
        )
        assert config.error is not None
        assert "enabled" in config.error.message
        assert config.settings["enabled"] is True
    finally:
        await agent.stop_clean()


async def test_a_response_topic_the_agent_cannot_use_does_not_break_it(
    agent_a: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    controller = await started_with_controller(agent_a, recorder_factory, TOPICS.config)
    for bad_topic in ("soundedge/dev-a/reply/#", "soundedge/dev-b/reply/x"):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = bad_topic
        controller.client.publish(TOPICS.set, b'{"enabled": false}', qos=1, properties=props)
    # Still serving commands afterwards.
    reply = await send_set(controller, TOPICS, {"enabled": True}, "after")
    assert reply.ok
    assert agent_a.task is not None
    assert not agent_a.task.done()


async def test_the_agent_and_the_controller_talk_through_one_bridge(
    tmp_path: Path, broker: Broker
) -> None:
    """Both sides' connections (`edge.mqtt_client.MqttBridge`) against the real broker: QoS 1
    acknowledgements, a command with an MQTT 5 reply, each side's own error for an ACL refusal,
    SUBACK and UNSUBACK, clean closes."""
    loop = asyncio.get_running_loop()
    agent = Connection(
        agent_settings(tmp_path, broker).mqtt, "bridge-dev-a", (TOPICS.status, "offline"), loop
    )
    controller = ControllerConnection(
        ControllerMqttSettings(
            host=broker.host,
            port=broker.port,
            username="controller",
            password=broker.users["controller"],
        ),
        "bridge-controller",
        loop,
        persistent=False,
    )
    async with asyncio.timeout(30):
        await agent.open()
        await controller.open()
        try:
            await controller.subscribe([TOPICS.status, TOPICS.reply("ctl")])
            assert await agent.subscribe([TOPICS.set]) == []  # granted
            await agent.publish(TOPICS.status, "online", retain=True)
            status = await controller.messages.get()
            status.ack()
            assert (status.topic, status.payload, status.qos) == (TOPICS.status, b"online", 1)

            await controller.publish(TOPICS.set, b"{}", 1, TOPICS.reply("ctl"), b"corr")
            command = await agent.messages.get()
            assert command == Incoming(TOPICS.set, b"{}", TOPICS.reply("ctl"), b"corr")
            assert command.response_topic is not None
            await agent.publish(command.response_topic, b"ok", 1, None, command.correlation_data)
            reply = await controller.messages.get()
            reply.ack()
            assert (reply.topic, reply.payload) == (TOPICS.reply("ctl"), b"ok")
            assert reply.correlation_data == b"corr"

            with pytest.raises(MqttPublishRefusedError, match=r"^Not authorized$"):
                await agent.publish("soundedge/dev-b/status", b"forged")
            with pytest.raises(ControllerMqttError, match="the broker refused the message"):
                await controller.publish(TOPICS.info, b"forged")
            await controller.unsubscribe([TOPICS.reply("ctl"), "never/subscribed"])
        finally:
            await agent.close()
            await controller.close()
    with pytest.raises(MqttError, match="not connected"):
        await agent.publish(TOPICS.status, "late")
    with pytest.raises(ControllerMqttError, match="not connected"):
        await controller.publish(TOPICS.set, b"{}")


def dynsec_broker(workdir: Path) -> Broker:
    """Mosquitto with its dynamic-security plugin instead of the project's ACL file.

    Mosquitto's ACL file grants every subscription and filters at delivery; brokers with an
    auth plugin (Home Assistant's Mosquitto add-on among them) refuse it in the SUBACK. Here
    `dev-a` may publish its own topics and discovery, and subscribe to Home Assistant's
    status, but not to its `set` topic.
    """
    broker = Broker(workdir, free_port(), users={"dev-a": "pw-a", "controller": "pw-c"})
    workdir.mkdir()

    def client(name: str, role: str) -> dict[str, Any]:
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", broker.users[name].encode(), salt, 101)
        return {
            "username": name,
            "password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(),
            "iterations": 101,
            "roles": [{"rolename": role}],
        }

    def acl(kind: str, topic: str) -> dict[str, Any]:
        return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}

    security = {
        "defaultACLAccess": {
            "publishClientSend": False, "publishClientReceive": True,
            "subscribe": False, "unsubscribe": True,
        },
        "clients": [client("dev-a", "device"), client("controller", "watcher")],
        "groups": [],
        "roles": [
            {"rolename": "device", "acls": [
                acl("publishClientSend", "soundedge/dev-a/#"),
                acl("publishClientSend", "homeassistant/+/dev-a/+/config"),
                acl("subscribePattern", "homeassistant/status"),
            ]},
            {"rolename": "watcher", "acls": [acl("subscribePattern", "soundedge/#")]},
        ],
    }  # fmt: skip
    (workdir / "dynsec.json").write_text(json.dumps(security))
    broker.conf_path.write_text(
        f"user {getpass.getuser()}\n"
        "allow_anonymous false\n"
        f"plugin {DYNSEC_PLUGIN}\n"
        f"plugin_opt_config_file {workdir / 'dynsec.json'}\n"
        f"listener {broker.port} 127.0.0.1\n"
    )
    return broker


async def test_a_refused_subscription_is_said_and_the_agent_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not DYNSEC_PLUGIN.exists():
        pytest.fail(f"{DYNSEC_PLUGIN} is missing: apt-get install mosquitto")
    broker = dynsec_broker(tmp_path / "broker")
    broker.start()
    watcher = MqttRecorder(broker)
    try:
        agent = AgentUnderTest.build(agent_settings(tmp_path / "a", broker))
        watcher.connect()
        watcher.subscribe("soundedge/dev-a/#")
        with caplog.at_level(logging.ERROR, logger="edge.mqtt"):
            agent.start()
            await wait_for(watcher, lambda ms: on(TOPICS.status)(ms) and on(TOPICS.health)(ms))
            record = agent.emit()
            ends = await wait_for(watcher, lambda ms: len(events(ms, TOPICS.event, "end")) == 1)
        assert "refused the subscription to soundedge/dev-a/set" in caplog.text
        assert "homeassistant/status" not in caplog.text  # that one was granted
        assert "check the ACL of user 'dev-a'" in caplog.text
        assert watcher.on(TOPICS.status)[0].payload == b"online"
        assert events(ends, TOPICS.event, "end")[0]["event_id"] == record.event_id
        assert agent.publisher.connections == 1  # the same session went on
        await agent.stop_clean()
    finally:
        watcher.close()
        broker.stop()


async def test_the_event_sender_stops_when_cancelled_just_as_it_is_woken(
    tmp_path: Path, broker: Broker
) -> None:
    """A stop that lands as an acknowledgement wakes the sender (as in the drain before
    `stopped`) must still end it: Python 3.11's asyncio.wait_for swallowed such a
    cancellation, and the agent's stop then waited for the sender forever."""
    agent = AgentUnderTest.build(agent_settings(tmp_path, broker))
    publisher = agent.publisher
    await asyncio.to_thread(publisher.outbox.open)
    conn = Connection(
        agent.settings.mqtt, "t-sender", ("t/status", "offline"), asyncio.get_running_loop()
    )  # never opened: with an empty outbox the sender only waits
    try:
        sender = asyncio.create_task(publisher._async_send_events(conn))
        await asyncio.sleep(0.05)  # it waits for a wake-up
        publisher._wake.set()
        sender.cancel()
        done, _ = await asyncio.wait({sender}, timeout=5)
        assert sender in done, "the sender went on after it was cancelled"
        assert sender.cancelled()
    finally:
        if not sender.done():
            sender.cancel()
            await asyncio.wait({sender})
        publisher.outbox.close()
        agent.store.close()
