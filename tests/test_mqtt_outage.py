"""Store and forward: events that happen while the broker is away, across an agent restart,
all arrive once it returns, in seq order; a crash of the agent publishes `offline`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.messages.mqtt import EventEndMessage, HealthMessage, parse_event_message
from edge.topics import DeviceTopics
from tests.fixtures.broker import Broker, MqttRecorder, Received
from tests.test_mqtt_publisher import AgentUnderTest, agent_settings, wait_for

pytestmark = pytest.mark.system

TOPICS = DeviceTopics("soundedge", "dev-a")


async def poll_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Until `condition()` holds (for state without a notification to wait on)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


def first_ends(messages: list[Received]) -> list[EventEndMessage]:
    """`end` messages in arrival order, duplicates (at-least-once) removed."""
    seen: dict[str, EventEndMessage] = {}
    for message in messages:
        if message.topic == TOPICS.event:
            parsed = parse_event_message(message.payload)
            if isinstance(parsed, EventEndMessage):
                seen.setdefault(parsed.event_id, parsed)
    return list(seen.values())


async def test_events_during_a_broker_outage_arrive_in_order_after_it(
    tmp_path: Path, broker: Broker, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    controller = recorder_factory(persistent=True)
    controller.connect()
    controller.subscribe(TOPICS.event)
    settings = agent_settings(tmp_path / "a", broker)
    agent = AgentUnderTest.build(settings)
    agent.start()
    await poll_until(lambda: agent.publisher.connections == 1)
    before = agent.emit()
    await wait_for(controller, lambda ms: len(first_ends(ms)) == 1)

    await asyncio.to_thread(broker.stop)
    during = [agent.emit(), agent.emit()]
    await asyncio.sleep(1.0)  # the agent notices and retries meanwhile
    await agent.stop_clean()  # restarted while the broker is still away
    agent = AgentUnderTest.build(settings)
    agent.start()
    during += [agent.emit(), agent.emit(), agent.emit()]
    await poll_until(lambda: agent.publisher.outbox.depth == 10)  # 5 starts + 5 ends wait
    await asyncio.to_thread(broker.start)

    messages = await wait_for(controller, lambda ms: len(first_ends(ms)) == 6, 60)
    ends = first_ends(messages)
    assert [e.seq for e in ends] == [before.seq] + [r.seq for r in during]
    assert [e.event_id for e in ends[1:]] == [r.event_id for r in during]
    # The outbox is empty once everything was acknowledged (health reports its depth).
    health = recorder_factory()
    health.connect()
    health.subscribe(TOPICS.health)
    await wait_for(
        health,
        lambda ms: any(HealthMessage.model_validate_json(m.payload).outbox_depth == 0 for m in ms),
    )
    await agent.stop_clean()


async def test_agent_keeps_working_and_reconnects_when_the_broker_restarts(
    tmp_path: Path, broker: Broker, recorder_factory: Callable[..., MqttRecorder]
) -> None:
    watcher = recorder_factory(persistent=True)
    watcher.connect()
    watcher.subscribe(TOPICS.status)
    agent = AgentUnderTest.build(agent_settings(tmp_path / "a", broker))
    agent.start()
    await wait_for(watcher, lambda ms: any(m.payload == b"online" for m in ms))
    for restart in range(2):
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(broker.start)
        await poll_until(lambda n=restart: agent.publisher.connections == n + 2, 60)
    # `online` again after every reconnect.
    await wait_for(watcher, lambda ms: sum(m.payload == b"online" for m in ms) >= 3, 30)
    await agent.stop_clean()


async def test_wrong_credentials_stop_the_retries_but_not_the_agent(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = agent_settings(tmp_path / "a", broker, password="wrong")
    agent = AgentUnderTest.build(settings)
    agent.start()
    await poll_until(lambda: "not retrying" in caplog.text)
    agent.emit()  # events are still taken into the outbox
    await asyncio.sleep(0.5)
    assert agent.publisher.connections == 0
    assert agent.task is not None
    assert not agent.task.done()
    await agent.stop_clean()
    assert agent.publisher.outbox.depth == 2
