"""End to end: `python3 -m edge run` with sounds played into the virtual microphone, reporting
to a real Mosquitto with the project's configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge.messages.mqtt import (
    ConfigMessage,
    EventEndMessage,
    EventStartMessage,
    HealthMessage,
    InfoMessage,
    parse_event_message,
)
from edge.topics import DeviceTopics
from tests.fixtures.broker import Broker, MqttRecorder, Received
from tests.fixtures.virtual_mic import DEVICE_NAME, VirtualMic

pytestmark = [pytest.mark.system, pytest.mark.slow]

TOPICS = DeviceTopics("soundedge", "dev-a")


class AgentProcess:
    """`python3 -m edge run` as device `dev-a`, its output in a log file."""

    def __init__(self, data_dir: Path, broker: Broker) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}-agent.log"
        env = broker.env("dev-a")
        env.update(
            SOUNDEDGE_DEVICE_ID="dev-a",
            SOUNDEDGE_DATA_DIR=str(data_dir),
            SOUNDEDGE_AUDIO__DEVICE=DEVICE_NAME,
            SOUNDEDGE_WS__ENABLED="false",
            SOUNDEDGE_RECORDING__PRE_ROLL_S="0.5",
            SOUNDEDGE_RECORDING__POST_ROLL_S="0.5",
            SOUNDEDGE_MQTT__HEALTH_INTERVAL_S="1",
            SOUNDEDGE_MQTT__LEVEL_INTERVAL_S="1",
            SOUNDEDGE_MQTT__RECONNECT_MIN_S="0.2",
            SOUNDEDGE_MQTT__RECONNECT_MAX_S="2",
        )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The environment is read now: the virtual microphone sets PULSE_SERVER in os.environ.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run"], env=env, stdout=log, stderr=log
            )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged_events(self) -> list[dict[str, object]]:
        log = self.data_dir / "events.jsonl"
        if not log.exists():
            return []
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [line["record"] for line in lines if line["kind"] == "event"]

    def start_listening(self, timeout_s: float = 30.0) -> None:
        """Start, and return once this run captures (the log file spans restarts)."""
        runs = self.output().count("capturing from")
        self.start()
        wait_until(
            lambda: self.output().count("capturing from") > runs, timeout_s, "the agent to capture"
        )
        time.sleep(2.0)  # let the noise floor settle on the silence stream

    def play_until_recorded(self, mic: VirtualMic, tone: Path, total: int) -> None:
        """Play `tone` until the event log holds `total` events, one event per play.

        A play that the capture missed (the virtual device can take a moment to deliver after
        the stream opens on a loaded machine) is simply repeated.
        """
        for _ in range(3 * total):
            count = len(self.logged_events())
            if count >= total:
                return
            mic.play(tone)
            deadline = time.monotonic() + 4.0
            while len(self.logged_events()) == count and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
        raise AssertionError(f"only {len(self.logged_events())} of {total} events recorded")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def agent(tmp_path: Path, broker: Broker) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path / "data", broker)
    yield process
    if process.proc is not None:
        process.stop(signal.SIGKILL)


def events_of(messages: list[Received], kind: type) -> list[EventStartMessage | EventEndMessage]:
    parsed = [parse_event_message(m.payload) for m in messages if m.topic == TOPICS.event]
    return [p for p in parsed if isinstance(p, kind)]


def test_agent_reports_status_info_health_and_events(
    agent: AgentProcess,
    virtual_mic: VirtualMic,
    recorder_factory: Callable[..., MqttRecorder],
) -> None:
    watcher = recorder_factory()
    watcher.connect()
    watcher.subscribe("soundedge/dev-a/#")
    tone = virtual_mic.write_tone("tone.wav", seconds=0.6, amplitude=0.4)
    agent.start_listening()
    agent.play_until_recorded(virtual_mic, tone, 2)
    messages = watcher.wait_for(lambda ms: len(events_of(ms, EventEndMessage)) >= 2, 60)

    status = [m for m in messages if m.topic == TOPICS.status]
    assert status[0].payload == b"online"
    info = InfoMessage.model_validate_json(
        next(m for m in messages if m.topic == TOPICS.info).payload
    )
    assert info.device_id == "dev-a"
    assert info.audio["samplerate"] == 48000
    healths = [
        HealthMessage.model_validate_json(m.payload) for m in messages if m.topic == TOPICS.health
    ]
    assert healths
    assert healths[-1].capture_state == "running"
    ConfigMessage.model_validate_json(next(m for m in messages if m.topic == TOPICS.config).payload)

    starts = events_of(messages, EventStartMessage)
    ends = events_of(messages, EventEndMessage)
    assert [s.seq for s in starts][:2] == [1, 2]
    assert [e.seq for e in ends][:2] == [1, 2]
    logged = agent.logged_events()
    for end in ends[:2]:
        assert isinstance(end, EventEndMessage)
        assert end.file is not None
        record = next(r for r in logged if r["event_id"] == end.event_id)
        assert end.to_record().model_dump(mode="json") == record
        path = agent.data_dir / "events" / end.onset_time.strftime("%Y-%m-%d") / end.file.name
        assert path.stat().st_size == end.file.size_bytes

    assert agent.stop() == 0
    final = watcher.wait_for(
        lambda ms: [m.payload for m in ms if m.topic == TOPICS.status][-1:] == [b"stopped"], 30
    )
    assert final


def test_kill_9_publishes_offline_then_a_restart_online(
    agent: AgentProcess,
    virtual_mic: VirtualMic,
    recorder_factory: Callable[..., MqttRecorder],
) -> None:
    watcher = recorder_factory()
    watcher.connect()
    watcher.subscribe(TOPICS.status)

    def statuses() -> list[bytes]:
        return [m.payload for m in watcher.on(TOPICS.status)]

    agent.start()
    watcher.wait_for(lambda ms: b"online" in [m.payload for m in ms], 60)
    agent.stop(signal.SIGKILL)
    watcher.wait_for(lambda ms: [m.payload for m in ms][-1:] == [b"offline"], 30)
    agent.start()
    watcher.wait_for(lambda ms: [m.payload for m in ms][-1:] == [b"online"], 60)
    assert statuses()[-3:] == [b"online", b"offline", b"online"]


def test_broker_outage_with_an_agent_restart_loses_nothing(
    agent: AgentProcess,
    virtual_mic: VirtualMic,
    broker: Broker,
    recorder_factory: Callable[..., MqttRecorder],
) -> None:
    controller = recorder_factory(persistent=True)
    controller.connect()
    controller.subscribe(TOPICS.event)
    tone = virtual_mic.write_tone("tone.wav", seconds=0.5, amplitude=0.4)
    agent.start_listening()

    broker.stop()
    stopped_at = time.monotonic()
    agent.play_until_recorded(virtual_mic, tone, 2)
    assert agent.stop() == 0  # a clean stop while the broker is away
    agent.start_listening()
    agent.play_until_recorded(virtual_mic, tone, 5)
    time.sleep(max(0.0, 20.0 - (time.monotonic() - stopped_at)))
    broker.start()

    def ends(messages: list[Received]) -> list[int]:
        return [e.seq for e in events_of(messages, EventEndMessage)]

    messages = controller.wait_for(lambda ms: len(set(ends(ms))) >= 5, 90)
    seqs = list(dict.fromkeys(ends(messages)))  # at least once: duplicates allowed, not gaps
    assert seqs == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in agent.logged_events()] == [1, 2, 3, 4, 5]
