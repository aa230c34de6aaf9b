"""MQTT latency: a sound's onset in the virtual microphone to its `start` message at a subscriber.

Runs the real agent (`python3 -m edge run`) against a Mosquitto started with the project's
configuration on loopback, plays N tones into the PulseAudio virtual microphone and, for each
`start` message, takes arrival wall time minus the event's `onset_time` (the detector's onset
sample on the agent's capture clock; same machine, same wall clock). The peer in the same run:
a plain paho QoS 1 publish to a subscriber on the same broker (the floor MQTT itself sets).

    python3 bench/mqtt_latency.py [--events 50]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mqtt_publisher_latency import run as publisher_latency  # noqa: E402
from edge.messages.mqtt import EventStartMessage, parse_event_message  # noqa: E402
from tests.fixtures.broker import Broker, MqttRecorder, free_port  # noqa: E402
from tests.fixtures.virtual_mic import DEVICE_NAME, VirtualMic, start_virtual_mic  # noqa: E402

BLOCKSIZE = 1024
SAMPLERATE = 48000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def agent_latency(
    broker: Broker,
    mic: VirtualMic,
    workdir: Path,
    events: int,
    audio_latency: str,
    min_event_s: float | None,
) -> list[float]:
    watcher = MqttRecorder(broker)
    watcher.connect()
    watcher.subscribe("soundedge/dev-a/event")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    env.update(broker.env("dev-a"))
    env.update(
        SOUNDEDGE_DEVICE_ID="dev-a",
        SOUNDEDGE_DATA_DIR=str(workdir / "data"),
        SOUNDEDGE_AUDIO__DEVICE=DEVICE_NAME,
        SOUNDEDGE_AUDIO__BLOCKSIZE=str(BLOCKSIZE),
        SOUNDEDGE_AUDIO__LATENCY=audio_latency,
        SOUNDEDGE_WS__ENABLED="false",
        SOUNDEDGE_RECORDING__PRE_ROLL_S="0.2",
        SOUNDEDGE_RECORDING__POST_ROLL_S="0.2",
        SOUNDEDGE_MQTT__DISCOVERY="false",
    )
    if min_event_s is not None:
        env["SOUNDEDGE_DETECTOR__MIN_EVENT_S"] = str(min_event_s)
    log = (workdir / "agent.log").open("ab")
    agent = subprocess.Popen([sys.executable, "-m", "edge", "run"], env=env, stdout=log, stderr=log)
    tone = mic.write_tone("tone.wav", seconds=0.3, amplitude=0.4)
    try:
        deadline = time.monotonic() + 30
        while "capturing from" not in (workdir / "agent.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not start capturing")
            time.sleep(0.1)
        time.sleep(2.0)  # noise floor
        for _ in range(events):
            mic.play(tone)
            time.sleep(0.9)
        received = watcher.wait_for(
            lambda ms: sum(b'"type":"start"' in m.payload for m in ms) >= events, 60
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        log.close()
        watcher.close()
    latencies = []
    for message in received:
        parsed = parse_event_message(message.payload)
        if isinstance(parsed, EventStartMessage):
            arrival = message_wall_time(message.at)
            latencies.append((arrival - parsed.onset_time.timestamp()) * 1000.0)
    return latencies[:events]


def message_wall_time(monotonic_at: float) -> float:
    """Wall time of a monotonic arrival stamp (the recorder stamps with time.monotonic())."""
    return time.time() - (time.monotonic() - monotonic_at)


def paho_round_trip(broker: Broker, count: int) -> list[float]:
    watcher = MqttRecorder(broker)
    watcher.connect()
    watcher.subscribe("soundedge/dev-b/event")
    sender = MqttRecorder(broker, "dev-b")
    sender.connect()
    latencies = []
    try:
        for index in range(count):
            sent = time.monotonic()
            sender.client.publish("soundedge/dev-b/event", b"x" * 300, qos=1)
            got = watcher.wait_for(lambda ms, n=index: len(ms) > n, 10)
            latencies.append((got[index].at - sent) * 1000.0)
            time.sleep(0.02)
    finally:
        sender.close()
        watcher.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--audio-latency", default="high", help="SOUNDEDGE_AUDIO__LATENCY")
    parser.add_argument(
        "--min-event-s",
        type=float,
        help="SOUNDEDGE_DETECTOR__MIN_EVENT_S (the detector fires `start` only after this)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "broker").mkdir()
        (workdir / "pulse").mkdir()
        broker = Broker(workdir / "broker", free_port())
        broker.prepare()
        broker.start()
        mic = start_virtual_mic(workdir / "pulse")
        try:
            peer = paho_round_trip(broker, args.events)
            share = publisher_latency(broker, workdir / "share", args.events)
            agent = agent_latency(
                broker, mic, workdir, args.events, args.audio_latency, args.min_event_s
            )
        finally:
            mic.stop()
            broker.stop()
    block_ms = 1000.0 * BLOCKSIZE / SAMPLERATE
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, block {block_ms:.1f} ms"
    )
    print("| path | n | p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, values in (("sound onset → `start` at subscriber", agent),
                         ("publisher share: `EventStarted` on the bus → subscriber", share),
                         ("peer: paho QoS 1 publish → subscriber", peer)):  # fmt: skip
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.1f} | "
            f"{percentile(values, 95):.1f} | {max(values):.1f} |"
        )
    print(f"target p95 ≤ {block_ms + 30:.1f} ms (one block + 30 ms)")


if __name__ == "__main__":
    main()
