"""The ledger for system tests: a real Mosquitto, two agents (`python3 -m edge run` on the
virtual microphone, real PortAudio `pulse` device), and what a controller must end up with.

`Ledger.check()` is the assertion every fault test ends with: every event the agents logged is
in the controller's archive once, verified by size and sha256, with no half-written file left,
and appears in the MQTT `end` stream (recorded by a persistent subscriber).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.settings import ControllerSettings
from edge.messages.mqtt import EventEndMessage, parse_event_message
from tests.fixtures.broker import Broker, MqttRecorder
from tests.fixtures.virtual_mic import VirtualMic
from tests.test_controller_system import (
    DEVICES,
    AgentProcess,
    archived_ids,
    check_archive,
    eventually,
    play_until_recorded,
    settings_for,
    wait_until,
)

EVENT_TOPICS = "soundedge/+/event"


class EndStream(MqttRecorder):
    """A persistent subscriber to every device's events that subscribes again on reconnection
    (a broker whose persistence was wiped forgets the session)."""

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(EVENT_TOPICS, 1)
        super()._on_connect(client, userdata, flags, rc, props)

    def end_counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for message in list(self.messages):
            if message.topic.endswith("/event"):
                parsed = parse_event_message(message.payload)
                if isinstance(parsed, EventEndMessage):
                    counts[parsed.event_id] += 1
        return counts

    def start_ids(self, device_id: str) -> set[str]:
        found = set()
        for message in list(self.messages):
            if message.topic == f"soundedge/{device_id}/event":
                parsed = parse_event_message(message.payload)
                if not isinstance(parsed, EventEndMessage):
                    found.add(parsed.event_id)
        return found


@dataclass
class Outcome:
    """What a fault test saw, for docs/reliability.md."""

    events: int
    lost: int
    corrupt: int
    end_duplicates: int


@dataclass
class Ledger:
    broker: Broker
    mic: VirtualMic
    agents: list[AgentProcess]
    archive: Path
    ends: EndStream

    def settings(self, **overrides: Any) -> ControllerSettings:
        return settings_for(self.broker, self.archive, **overrides)

    def agent(self, device_id: str) -> AgentProcess:
        return next(a for a in self.agents if a.device_id == device_id)

    async def play(self, total_each: int, agents: list[AgentProcess] | None = None) -> None:
        tone = self.mic.workdir / "ledger-tone.wav"
        if not tone.exists():
            tone = self.mic.write_tone("ledger-tone.wav", seconds=0.5, amplitude=0.4)
        await asyncio.to_thread(
            play_until_recorded, agents or self.agents, self.mic, tone, total_each
        )

    def wanted(self) -> set[str]:
        return {r["event_id"] for a in self.agents for r in a.records()}

    async def wait_archived(self) -> None:
        wanted = self.wanted()
        await eventually(lambda: wanted <= set(archived_ids(self.archive)))

    async def wait_ends(self, timeout_s: float = 60.0) -> None:
        wanted = self.wanted()
        await asyncio.to_thread(
            self.ends.wait_for, lambda _: wanted <= set(self.ends.end_counts()), timeout_s
        )

    def check(self, end_stream: bool = True) -> Outcome:
        """Every logged event archived (verified) once; in the `end` stream at least once."""
        check_archive(self.archive, self.agents)
        wanted = self.wanted()
        counts = self.ends.end_counts()
        if end_stream:
            assert wanted <= set(counts), f"missing from the end stream: {wanted - set(counts)}"
        archived = archived_ids(self.archive)
        return Outcome(
            events=len(wanted),
            lost=len(wanted - set(archived)),
            corrupt=0,  # check_archive failed otherwise
            end_duplicates=sum(n - 1 for e, n in counts.items() if e in wanted and n > 1),
        )


def restart(agent: AgentProcess, timeout_s: float = 60.0) -> None:
    """Start `agent` again and return once this run captures (its log spans restarts)."""
    runs = agent.output().count("capturing from")
    agent.start()
    wait_until(lambda: agent.output().count("capturing from") > runs, "a restart", timeout_s)
    time.sleep(2.0)  # the noise floor settles on the silence stream


@pytest.fixture
def ledger(tmp_path: Path, broker: Broker, virtual_mic: VirtualMic) -> Iterator[Ledger]:
    fleet = [AgentProcess(d, tmp_path / d, broker) for d in DEVICES]
    ends = EndStream(broker, persistent=True)
    ends.connect()
    ends.subscribe(EVENT_TOPICS)
    for agent in fleet:
        agent.start()
    try:
        wait_until(lambda: all("capturing from" in a.output() for a in fleet), "the agents")
        time.sleep(2.0)  # let the noise floors settle on the silence stream
        yield Ledger(broker, virtual_mic, fleet, tmp_path / "archive", ends)
    finally:
        for agent in fleet:
            agent.stop()
        ends.close()
