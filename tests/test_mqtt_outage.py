"""Store and forward: events that happen while the broker is away, across an agent restart,
all arrive once it returns, in seq order; a crash of the agent publishes `offline`; a broker
that drops a client at once after each connect is not hammered, by either side."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from controller.mqtt import Connection as ControllerConnection
from controller.mqtt import supervise
from controller.settings import ControllerMqttSettings
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


def take_over(broker: Broker, user: str, client_id: str) -> None:
    """Connect as `client_id` (the broker then drops the client that had it) and leave."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(user, broker.users[user])
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    deadline = time.monotonic() + 10.0
    while not client.is_connected():
        assert time.monotonic() < deadline, "no CONNACK for the taking-over client"
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()


RECONNECT_DELAY = re.compile(r"MQTT connection lost \(.*\); reconnecting in ([0-9.]+) s")


@pytest.mark.parametrize("side", ["agent", "controller"])
async def test_a_client_dropped_right_after_each_connect_backs_off(
    side: str, tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """Another client with the same client id (a copied configuration) takes the session over
    each time: the waits between reconnects grow instead of staying at the shortest."""
    caplog.set_level(logging.INFO)
    min_s, kicks = 0.2, 4
    connected: asyncio.Queue[None] = asyncio.Queue()
    stop = asyncio.Event()
    finish: Callable[[], Awaitable[None]]
    if side == "agent":
        settings = agent_settings(tmp_path, broker, reconnect_min_s=min_s, reconnect_max_s=5.0)
        agent = AgentUnderTest.build(settings)
        user, client_id = "dev-a", agent.publisher.client_id
        agent.start()

        async def count_connections() -> None:
            seen = 0
            while True:
                if agent.publisher.connections > seen:
                    seen += 1
                    connected.put_nowait(None)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(count_connections())

        async def finish_agent() -> None:
            watcher.cancel()
            await agent.stop_clean()

        finish = finish_agent
    else:
        controller_settings = ControllerMqttSettings(
            host=broker.host,
            port=broker.port,
            username="controller",
            password=broker.users["controller"],
            reconnect_min_s=min_s,
            reconnect_max_s=5.0,
        )
        user, client_id = "controller", "t-flapping-controller"

        async def session(conn: ControllerConnection) -> None:
            connected.put_nowait(None)
            await asyncio.Event().wait()

        task = asyncio.create_task(
            supervise(controller_settings, client_id, ["soundedge/+/status"], session, stop)
        )

        async def finish_controller() -> None:
            stop.set()
            await task

        finish = finish_controller
    try:
        for _ in range(kicks):
            async with asyncio.timeout(30):
                await connected.get()
            await asyncio.to_thread(take_over, broker, user, client_id)
        async with asyncio.timeout(30):
            await connected.get()  # back after the last drop
    finally:
        await finish()
    delays = [float(m[1]) for r in caplog.records if (m := RECONNECT_DELAY.search(r.getMessage()))]
    assert len(delays) == kicks, delays
    # Each drop counts as a failure: the k-th wait is in [min * 2**k / 2, min * 2**k] (the log
    # rounds it to 0.1 s).
    for k, delay in enumerate(delays):
        assert min_s * 2**k / 2 - 0.05 <= delay <= min_s * 2**k + 0.05, (k, delays)
