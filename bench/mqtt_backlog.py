"""MQTT backlog: how fast queued events are delivered when the broker comes back.

An event log with N finished events and their N `start` messages in the outbox (as after an
outage) is handed to the real publisher; the clock runs from its first connect to the last
`end` at a subscriber on loopback (Mosquitto with the project's configuration). The peer in the
same run: plain paho publishing the same 2N payloads at QoS 1 with the same window.

    python3 bench/mqtt_backlog.py [--events 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.bus import EventBus  # noqa: E402
from edge.messages.common import EventFile, EventRecord  # noqa: E402
from edge.messages.mqtt import EventStartMessage  # noqa: E402
from edge.mqtt import EVENT_WINDOW, MqttPublisher  # noqa: E402
from edge.outbox import Outbox  # noqa: E402
from edge.runtime import RuntimeConfig  # noqa: E402
from edge.settings import AgentSettings, MqttSettings  # noqa: E402
from edge.state import AgentState  # noqa: E402
from edge.store import EventStore  # noqa: E402
from tests.fixtures.broker import Broker, MqttRecorder, free_port  # noqa: E402

T0 = datetime(2026, 11, 25, tzinfo=UTC)


def fill(settings: AgentSettings, events: int) -> list[bytes]:
    """N events in the log and N starts in the outbox; returns the payloads (for the peer)."""
    store = EventStore(settings.data_dir, settings.device_id, settings.storage)
    store.open()
    outbox = Outbox(settings.data_dir / "state", store, "ws://pi:8765")
    outbox.open()
    for _ in range(events):
        seq = store.reserve_seq()
        event_id = uuid.uuid4().hex
        onset = T0 + timedelta(seconds=seq)
        outbox.add_start(
            EventStartMessage(
                event_id=event_id, seq=seq, device_id="dev-a", onset_time=onset,
                level_dbfs=-20.0, noise_floor_dbfs=-60.0,
            )
        )  # fmt: skip
        store.add(
            EventRecord(
                event_id=event_id, seq=seq, device_id="dev-a", onset_time=onset,
                offset_time=onset, duration_s=0.5, file_start_time=onset, pre_roll_s=2.0,
                post_roll_s=2.0, peak_dbfs=-3.0, noise_floor_dbfs=-60.0,
                file=EventFile(name=f"dev-a_{seq:06d}.wav", size_bytes=400000, sha256="a" * 64,
                               format="wav", duration_s=4.5, samplerate=48000, channels=1),
            ),
            None,
        )  # fmt: skip
    payloads = [item.payload for item in outbox.next_items(2 * events)]
    outbox.close()
    store.close()
    return payloads


async def drain(settings: AgentSettings, broker: Broker, events: int) -> float:
    watcher = MqttRecorder(broker)
    watcher.connect()
    watcher.subscribe("soundedge/dev-a/event")
    runtime = RuntimeConfig(settings)
    store = EventStore(settings.data_dir, settings.device_id, settings.storage)
    store.open()
    publisher = MqttPublisher(settings, runtime, store, EventBus(), AgentState(), "ws://pi:8765")
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    while publisher.connections == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    started = time.monotonic()
    await asyncio.to_thread(watcher.wait_for, lambda ms: len(ms) >= 2 * events, 300)
    elapsed = watcher.messages[-1].at - started
    stop.set()
    await asyncio.wait_for(task, 60)
    store.close()
    watcher.close()
    return elapsed


def peer(broker: Broker, payloads: list[bytes]) -> float:
    watcher = MqttRecorder(broker)
    watcher.connect()
    watcher.subscribe("soundedge/dev-b/event")
    sender = MqttRecorder(broker, "dev-b")
    sender.client.max_inflight_messages_set(EVENT_WINDOW)
    sender.connect()
    started = time.monotonic()
    for payload in payloads:
        sender.client.publish("soundedge/dev-b/event", payload, qos=1)
    watcher.wait_for(lambda ms: len(ms) >= len(payloads), 300)
    elapsed = watcher.messages[-1].at - started
    sender.close()
    watcher.close()
    return elapsed


def main() -> None:
    # The records have no audio files: the store's "file is missing" errors are expected.
    logging.getLogger("edge.store").disabled = True
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp), free_port())
        broker.prepare()
        broker.start()
        settings = AgentSettings(
            device_id="dev-a",
            data_dir=Path(tmp) / "data",
            mqtt=MqttSettings(
                host=broker.host, port=broker.port, username="dev-a",
                password=broker.users["dev-a"], discovery=False, health_interval_s=3600,
                level_interval_s=0,
            ),
        )  # fmt: skip
        try:
            payloads = fill(settings, args.events)
            ours = asyncio.run(drain(settings, broker, args.events))
            theirs = peer(broker, payloads)
        finally:
            broker.stop()
    n = args.events
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, {n} events queued")
    print("| path | messages | seconds | events/s (start+end pairs) | messages/s |")
    print("|---|---|---|---|---|")
    for name, seconds in (("outbox backlog after reconnect", ours),
                          ("peer: plain paho QoS 1, same window", theirs)):  # fmt: skip
        print(f"| {name} | {2 * n} | {seconds:.2f} | {n / seconds:.0f} | {2 * n / seconds:.0f} |")


if __name__ == "__main__":
    main()
