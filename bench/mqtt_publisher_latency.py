"""The publisher's share of the latency: `EventStarted` on the bus to `start` at a subscriber.

In-process, with the real publisher, event store, outbox (fsync) and a Mosquitto started with
the project's configuration on loopback. Imported by mqtt_latency.py; runnable alone:

    python3 bench/mqtt_publisher_latency.py [--events 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.bus import EventBus, EventStarted  # noqa: E402
from edge.mqtt import MqttPublisher  # noqa: E402
from edge.runtime import RuntimeConfig  # noqa: E402
from edge.settings import AgentSettings, MqttSettings  # noqa: E402
from edge.state import AgentState  # noqa: E402
from edge.store import EventStore  # noqa: E402
from tests.fixtures.broker import Broker, MqttRecorder, free_port  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def measure(broker: Broker, data_dir: Path, events: int) -> list[float]:
    settings = AgentSettings(
        device_id="dev-a",
        data_dir=data_dir,
        mqtt=MqttSettings(
            host=broker.host, port=broker.port, username="dev-a",
            password=broker.users["dev-a"], discovery=False,
        ),
    )  # fmt: skip
    runtime = RuntimeConfig(settings)
    store = EventStore(data_dir, "dev-a", settings.storage)
    store.open()
    bus = EventBus()
    publisher = MqttPublisher(settings, runtime, store, bus, AgentState(), "ws://x:1")
    watcher = MqttRecorder(broker)
    watcher.connect()
    watcher.subscribe("soundedge/dev-a/event")
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    while publisher.connections == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    sent_at: list[float] = []
    for index in range(events):
        seq = store.reserve_seq()
        sent_at.append(time.monotonic())
        bus.publish(EventStarted(uuid.uuid4().hex, seq, datetime.now(UTC), -20.0, -60.0))
        await asyncio.to_thread(watcher.wait_for, lambda ms, n=index: len(ms) > n, 10)
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 30)
    store.close()
    watcher.close()
    return [(m.at - s) * 1000.0 for m, s in zip(watcher.messages, sent_at, strict=True)]


def run(broker: Broker, data_dir: Path, events: int) -> list[float]:
    return asyncio.run(measure(broker, data_dir, events))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp), free_port())
        broker.prepare()
        broker.start()
        try:
            values = run(broker, Path(tmp) / "data", args.events)
        finally:
            broker.stop()
    print(
        f"bus → subscriber: n={len(values)} p50={statistics.median(values):.1f} ms "
        f"p95={percentile(values, 95):.1f} ms max={max(values):.1f} ms"
    )


if __name__ == "__main__":
    main()
