"""Faults an agent must survive on its own (no controller): a clock jump, the disk limit while
nobody collects, a broker that loses its persistence, oversized and deeply nested commands."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from edge.agent import Agent
from edge.capture import FileSource
from edge.fileio import sha256_of
from edge.messages.mqtt import ConfigMessage, HealthMessage, InfoMessage
from edge.settings import AgentSettings, StorageSettings
from edge.topics import DeviceTopics
from tests.fixtures.broker import Broker, MqttRecorder
from tests.helpers import record_event
from tests.test_mqtt_publisher import AgentUnderTest, agent_settings, send_set, wait_for

pytestmark = pytest.mark.system

RATE = 48000
TOPICS = DeviceTopics("soundedge", "dev-a")


def scene(path: Path, bursts: list[tuple[float, float]], seconds: float) -> Path:
    rng = np.random.default_rng(3)
    signal = (rng.standard_normal(int(seconds * RATE)) * 10 ** (-60 / 20)).astype(np.float32)
    for start_s, length_s in bursts:
        t = np.arange(int(length_s * RATE)) / RATE
        start = int(start_s * RATE)
        signal[start : start + t.size] += (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    sf.write(path, signal, RATE, subtype="PCM_16")
    return path


def file_settings(tmp_path: Path, **storage: float) -> AgentSettings:
    return AgentSettings(
        device_id="filepi",
        data_dir=tmp_path / "data",
        mqtt={"enabled": False},
        ws={"enabled": False},
        recording={"pre_roll_s": 0.25, "post_roll_s": 0.25},
        storage={"min_free_mb": 0.0, **storage},
    )


class SteppedClock:
    """A file source whose wall clock can be stepped, as NTP or an operator would."""

    def __init__(self, inner: FileSource) -> None:
        self.inner = inner
        self.step_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def clock_anchor(self) -> tuple[int, float]:
        frame, wall = self.inner.clock_anchor
        return frame, (wall + self.step_s if wall else wall)


@pytest.fixture
async def agent(tmp_path: Path, broker: Broker) -> AsyncIterator[AgentUnderTest]:
    """The MQTT publisher of device dev-a with its real store, bus and runtime config."""
    under_test = AgentUnderTest.build(agent_settings(tmp_path / "a", broker))
    yield under_test
    if under_test.task is not None and not under_test.task.done():
        await under_test.stop_clean()


async def until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_clock_jump_keeps_seq_monotonic_and_marks_the_event(tmp_path: Path) -> None:
    path = scene(tmp_path / "scene.wav", [(1.0, 0.4), (3.0, 1.5), (5.5, 0.4)], seconds=7.5)
    source = SteppedClock(FileSource(path, realtime=True))
    agent = Agent(file_settings(tmp_path), source)  # type: ignore[arg-type]
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.state.events_recorded == 1 and agent.state.event_active)
        source.step_s = -3600.0  # the wall clock goes back an hour in the middle of event 2
        await until(lambda: agent.state.events_recorded == 3)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, timeout=30)
    records = agent.store.records_since(0, 10)
    assert [r.seq for r in records] == [1, 2, 3]
    assert [r.clock_uncertain for r in records] == [False, True, False]
    assert agent.state.clock_jumps == 1
    # Times follow the wall clock (which went back), the seq does not.
    assert records[2].onset_time < records[0].onset_time
    for record in records:
        assert record.file is not None
        assert sha256_of(agent.store.path_of(record)) == record.file.sha256


def deletions(data_dir: Path) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in (data_dir / "events.jsonl").read_text().splitlines()]
    return [(line["event_id"], line["reason"]) for line in lines if line["kind"] == "deleted"]


async def test_the_disk_limit_while_nobody_collects_keeps_recording_within_it(
    tmp_path: Path,
) -> None:
    """A controller collected the first three events, then went away: recording goes on,
    collected files go first, then the oldest uncollected ones, and the hard limit holds."""
    path = scene(tmp_path / "loop.wav", [(0.3, 0.5)], seconds=1.2)
    settings = file_settings(tmp_path, max_disk_mb=0.25, hard_max_disk_mb=0.55)
    agent = Agent(settings, FileSource(path, realtime=True, loop=True))
    task = asyncio.create_task(agent.run())
    try:
        for seq in (1, 2, 3):
            await until(lambda n=seq: agent.state.events_recorded >= n)
            record = agent.store.records_since(seq - 1, 1)[0]
            assert agent.store.mark_collected(record.event_id)
        await until(lambda: agent.state.events_recorded >= 12)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, timeout=30)

    store = agent.store
    records = store.records_since(0, 100)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert store.event_bytes() <= settings.storage.hard_limit_mb * 1024 * 1024
    deleted = deletions(settings.data_dir)
    reasons = [reason for _, reason in deleted]
    assert reasons.count("retention (collected)") == 3
    assert reasons[:3] == ["retention (collected)"] * 3  # collected files go first
    uncollected = [event_id for event_id, reason in deleted if reason == "retention (uncollected)"]
    assert uncollected, "the test did not reach the hard limit"
    oldest = [r.event_id for r in records[3 : 3 + len(uncollected)]]
    assert uncollected == oldest
    for record in records:
        kept = store.file_for(record.event_id)
        if kept is not None:
            assert record.file is not None
            assert sha256_of(kept) == record.file.sha256
    assert not list((settings.data_dir / "events").glob("*/.*.part"))
    assert store.counters.files_deleted_uncollected == len(uncollected)


async def test_files_lost_to_the_disk_limit_are_reported_in_health(
    tmp_path: Path, broker: Broker, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    """The loss policy is visible over MQTT: uncollected files deleted by the hard limit."""
    settings = agent_settings(tmp_path / "a", broker)
    settings = settings.model_copy(
        update={"storage": StorageSettings(max_disk_mb=0.01, hard_max_disk_mb=0.02, min_free_mb=0)}
    )
    agent = AgentUnderTest.build(settings)
    for _ in range(4):
        record_event(agent.store, seconds=0.5)  # 16 kB each: over the hard limit
    report = agent.store.enforce_retention()
    assert report.deleted_uncollected >= 2
    watcher = recorder_factory()
    watcher.connect()
    watcher.subscribe(TOPICS.health)
    agent.start()
    try:
        messages = await wait_for(watcher, lambda ms: len(ms) >= 1)
    finally:
        await agent.stop_clean()
    health = HealthMessage.model_validate_json(messages[-1].payload)
    assert health.files_lost_uncollected == report.deleted_uncollected
    assert health.files_deleted_collected == 0


async def test_a_broker_that_lost_its_persistence_gets_the_retained_state_again(
    tmp_path: Path, broker: Broker, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    agent = AgentUnderTest.build(agent_settings(tmp_path / "a", broker))
    agent.start()
    try:
        first = recorder_factory()
        first.connect()
        first.subscribe("soundedge/dev-a/#")
        await wait_for(first, lambda ms: {TOPICS.info, TOPICS.config} <= {m.topic for m in ms})
        connections = agent.publisher.connections
        await asyncio.to_thread(broker.stop)
        (broker.workdir / "mosquitto.db").unlink()
        during = [agent.emit(), agent.emit()]  # kept in the outbox meanwhile
        await asyncio.to_thread(broker.start)
        await until(lambda: agent.publisher.connections > connections)
        wanted = {TOPICS.status, TOPICS.info, TOPICS.config}
        # Once the agent has published its state again (live or retained, whichever comes
        # first for a client subscribing now) ...
        probe = recorder_factory()
        probe.connect()
        probe.subscribe("soundedge/dev-a/#")
        await wait_for(probe, lambda ms: wanted <= {m.topic for m in ms})
        # ... a client arriving later gets the status, info and config retained, valid.
        late = recorder_factory()
        late.connect()
        late.subscribe("soundedge/dev-a/#")
        messages = await wait_for(late, lambda ms: wanted <= {m.topic for m in ms if m.retain})
        retained = {m.topic: m.payload for m in messages if m.retain}
        assert retained[TOPICS.status] == b"online"
        InfoMessage.model_validate_json(retained[TOPICS.info])
        ConfigMessage.model_validate_json(retained[TOPICS.config])
        await until(lambda: agent.publisher.outbox.depth == 0)
        assert [r.seq for r in during] == [1, 2]
    finally:
        await agent.stop_clean()


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        pytest.param("nested-arrays", b"[" * 100_000 + b"]" * 100_000, id="nested-arrays"),
        pytest.param(
            "nested-objects", b'{"a":' * 40_000 + b"1" + b"}" * 40_000, id="nested-objects"
        ),
        pytest.param(
            "long-string",
            b'{"detector": {"threshold_db": "' + b"9" * 250_000 + b'"}}',
            id="long-string",
        ),
        pytest.param(
            "many-keys", json.dumps({f"k{n}": n for n in range(15_000)}).encode(), id="many-keys"
        ),
    ],
)
async def test_set_payloads_near_the_size_limit_get_an_error(
    agent: AgentUnderTest,
    recorder_factory: Callable[..., MqttRecorder],
    name: str,
    payload: bytes,
) -> None:
    assert len(payload) < 262_144  # mosquitto/mosquitto.conf message_size_limit
    controller = recorder_factory()
    controller.connect()
    controller.subscribe(TOPICS.config)
    controller.subscribe(TOPICS.reply("ctl"))
    agent.start()
    await wait_for(controller, lambda ms: any(m.topic == TOPICS.config for m in ms))
    before = agent.runtime.settings
    reply = await send_set(controller, TOPICS, payload, name)
    assert not reply.ok
    assert reply.error
    assert len(json.dumps(reply.model_dump(mode="json"))) < 2000  # the input is not echoed
    assert agent.runtime.settings == before
    after = await send_set(controller, TOPICS, {"enabled": True}, f"{name}-after")
    assert after.ok


async def test_a_set_payload_over_the_broker_limit_never_reaches_the_agent(
    agent: AgentUnderTest, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    controller = recorder_factory()
    controller.connect()
    controller.subscribe(TOPICS.config)
    controller.subscribe(TOPICS.reply("ctl"))
    agent.start()
    await wait_for(controller, lambda ms: any(m.topic == TOPICS.config for m in ms))
    connections = agent.publisher.connections
    # Mosquitto drops the message and the connection of whoever sent it (a separate client).
    sender = recorder_factory()
    sender.connect()
    info = sender.client.publish(TOPICS.set, b"{" + b" " * 300_000 + b"}", qos=1)
    await asyncio.to_thread(info.wait_for_publish, 10)
    reply = await send_set(controller, TOPICS, {"enabled": False}, "after-oversize")
    assert reply.ok
    assert agent.runtime.settings.enabled is False
    assert agent.publisher.connections == connections
