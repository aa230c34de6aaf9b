"""The controller under load: N simulated agents each finishing an event per second.

    python3 bench/controller_load.py [--agents 20] [--seconds 300] [--rate 1.0]

A Mosquitto with the project's configuration (one broker user per simulated agent) on
loopback. One child process simulates the agents with the agent's own parts: per agent a real
`EventStore`, a real `WsServer` (websocket, token) and an MQTT connection as its device user
that announces `online` and `info` and publishes an `end` message (QoS 1) for every event, from
a real WAV file written into the store (`--event-seconds` of 16-bit mono noise at
`--samplerate`). Agents keep their disk bounded with the store's retention (collected files go).

The controller is the real `python3 -m controller run` in another process. Every second the
parent reads the events published so far and the files archived (the controller's SQLite
database) and the controller's memory (VmRSS) and CPU time (/proc). Reported: files/s archived
over the run and over its last minute, the backlog (published - archived) and the memory at the
end of the production, then the time to drain the backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "bench-token"
OUT = REPO / "bench" / "out" / "controller_load.json"


# -- the simulated agents (child process) --------------------------------------------------------


def wav_bytes(seconds: float, samplerate: int) -> bytes:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(1)
    samples = (rng.standard_normal(int(seconds * samplerate)) * 3000).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, samples, samplerate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


class SimAgent:
    """One simulated agent: store, websocket server, MQTT connection."""

    def __init__(self, device_id: str, data_dir: Path, args: argparse.Namespace) -> None:
        from edge.bus import EventBus
        from edge.runtime import RuntimeConfig
        from edge.settings import AgentSettings, MqttSettings, StorageSettings, WsSettings
        from edge.store import EventStore
        from edge.wsserver import WsServer

        self.device_id = device_id
        self.args = args
        storage = StorageSettings(max_disk_mb=20, min_free_mb=0)
        self.store = EventStore(data_dir, device_id, storage)
        self.store.open()
        ws = WsSettings(host="127.0.0.1", port=0, token=TOKEN, max_clients=8)
        settings = AgentSettings(device_id=device_id, data_dir=data_dir, ws=ws)
        self.server = WsServer(ws, device_id, RuntimeConfig(settings), self.store, EventBus())
        self.mqtt_settings = MqttSettings(
            host="127.0.0.1", port=args.broker_port, username=device_id, password=args.password
        )
        self.published = 0
        self.stop = asyncio.Event()

    async def start(self) -> None:
        from edge.mqtt_client import Connection
        from edge.store import LogCompactor
        from edge.topics import DeviceTopics

        self.server_task = asyncio.create_task(self.server.run(self.stop))
        # As the agent runs it: retention's deletions compact the event log now and then.
        self.compactor_task = asyncio.create_task(LogCompactor(self.store).run(self.stop))
        await self.server.started.wait()
        self.url = f"ws://127.0.0.1:{self.server.port}"
        self.topics = DeviceTopics("soundedge", self.device_id)
        loop = asyncio.get_running_loop()
        self.conn = Connection(
            self.mqtt_settings, f"sim-{self.device_id}", (self.topics.status, "offline"), loop
        )
        await self.conn.open(30)
        await self.conn.publish(self.topics.info, self.info(), qos=1, retain=True)
        await self.conn.publish(self.topics.status, "online", qos=1, retain=True)

    def info(self) -> bytes:
        from edge.messages.mqtt import InfoMessage

        return (
            InfoMessage(
                device_id=self.device_id,
                version="bench",
                host="localhost",
                platform="bench",
                ws_url=self.url,
                started_at=datetime.now(UTC),
                mqtt_protocol="5",
                audio={},
                detector={},
                recording={},
            )
            .model_dump_json()
            .encode()
        )

    def make_event(self, data: bytes) -> Any:
        """Blocking: write one event file into the store, as the recorder does."""
        from tests.fixtures.ws_helpers import add_file_event

        return add_file_event(
            self.store, self.store.reserve_seq(), lambda pending: pending.write_bytes(data),
            onset=datetime.now(UTC), duration_s=self.args.event_seconds,
            samplerate=self.args.samplerate,
        )  # fmt: skip

    async def produce(self, data: bytes, phase_s: float, until: float) -> None:
        from edge.messages.mqtt import EventEndMessage

        loop = asyncio.get_running_loop()
        interval = 1.0 / self.args.rate
        next_at = loop.time() + phase_s
        retention_at = loop.time() + 10
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            record = await asyncio.to_thread(self.make_event, data)
            payload = EventEndMessage.from_record(record, self.url).model_dump_json()
            future = self.conn.publish(self.topics.event, payload, qos=1)
            future.add_done_callback(self._count)
            if loop.time() > retention_at:
                retention_at += 10
                await asyncio.to_thread(self.store.enforce_retention)

    def _count(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.published += 1

    async def close(self) -> None:
        await self.conn.close()
        self.stop.set()
        await self.server_task
        await self.compactor_task
        self.store.close()


async def simulate(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    agents = [SimAgent(f"sim-{i:02d}", workdir / f"sim-{i:02d}", args) for i in range(args.agents)]
    for agent in agents:
        await agent.start()
    data = wav_bytes(args.event_seconds, args.samplerate)
    print(json.dumps({"ready": True, "file_bytes": len(data)}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "go"
    loop = asyncio.get_running_loop()
    until = loop.time() + args.seconds
    counter = workdir / "published.json"

    async def report() -> None:
        while True:
            total = sum(a.published for a in agents)
            counter.write_text(json.dumps({"published": total}))
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report())
    await asyncio.gather(
        *(
            agent.produce(data, i / (args.agents * args.rate), until)
            for i, agent in enumerate(agents)
        )
    )
    await asyncio.sleep(2.0)  # last PUBACKs
    total = sum(a.published for a in agents)
    counter.write_text(json.dumps({"published": total, "done": True}))
    print(json.dumps({"published": total, "done": True}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "stop": keep serving files until then
    reporter.cancel()
    for agent in agents:
        await agent.close()


# -- the parent ---------------------------------------------------------------------------------


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # MiB
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    values["cpu_s"] = (int(fields[11]) + int(fields[12])) / ticks
    return values


def archived_count(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT COUNT(*) FROM events WHERE state = 'archived'").fetchone()
    except sqlite3.Error:
        return -1
    return int(row[0])


def published_count(workdir: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(json.loads((workdir / "published.json").read_text())["published"])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=1.0, help="events per second per agent")
    parser.add_argument("--event-seconds", type=float, default=3.0)
    parser.add_argument("--samplerate", type=int, default=16000)
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--broker-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--password", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulate:
        asyncio.run(simulate(args))
        return

    from tests.fixtures.broker import USERS, Broker, free_port

    password = "sim-secret"
    with tempfile.TemporaryDirectory(prefix="controller-load-") as tmp:
        workdir = Path(tmp)
        (workdir / "broker").mkdir()
        users = dict(USERS) | {f"sim-{i:02d}": password for i in range(args.agents)}
        broker = Broker(workdir / "broker", free_port(), users=users)
        broker.prepare()
        broker.start()
        sim = controller = None
        try:
            sim = subprocess.Popen(
                [sys.executable, __file__, "--simulate", "--workdir", str(workdir),
                 "--broker-port", str(broker.port), "--password", password,
                 "--agents", str(args.agents), "--seconds", str(args.seconds),
                 "--rate", str(args.rate), "--event-seconds", str(args.event_seconds),
                 "--samplerate", str(args.samplerate)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            )  # fmt: skip
            assert sim.stdin is not None
            assert sim.stdout is not None
            ready = json.loads(sim.stdout.readline())
            db_path = workdir / "controller.db"
            env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
            env.update(
                SOUNDEDGE_CONTROLLER_CONTROLLER_ID="bench",
                SOUNDEDGE_CONTROLLER_ARCHIVE_DIR=str(workdir / "archive"),
                SOUNDEDGE_CONTROLLER_DB_PATH=str(db_path),
                SOUNDEDGE_CONTROLLER_WS_TOKEN=TOKEN,
                SOUNDEDGE_CONTROLLER_MQTT__HOST=broker.host,
                SOUNDEDGE_CONTROLLER_MQTT__PORT=str(broker.port),
                SOUNDEDGE_CONTROLLER_MQTT__USERNAME="controller",
                SOUNDEDGE_CONTROLLER_MQTT__PASSWORD=broker.users["controller"],
                SOUNDEDGE_CONTROLLER_LOG_LEVEL="WARNING",
            )
            log = (workdir / "controller.log").open("wb")
            controller = subprocess.Popen(
                [sys.executable, "-m", "controller", "run"], env=env, stdout=log, stderr=log,
                cwd=REPO,
            )  # fmt: skip
            time.sleep(3.0)  # connected, devices known
            sim.stdin.write("go\n")
            sim.stdin.flush()
            started = time.monotonic()
            samples: list[dict[str, float]] = []
            while time.monotonic() - started < args.seconds + 2.5:
                time.sleep(1.0)
                sample = {
                    "t": time.monotonic() - started,
                    "published": published_count(workdir),
                    "archived": archived_count(db_path),
                    **proc_stats(controller.pid),
                }
                samples.append(sample)
                if len(samples) % 30 == 0:
                    print(json.dumps(sample), flush=True)
            json.loads(sim.stdout.readline())  # done
            end = {
                "t": time.monotonic() - started,
                "published": published_count(workdir),
                "archived": archived_count(db_path),
                **proc_stats(controller.pid),
            }
            # When the archive caught up with everything published (maybe before the end).
            drained_at = next(
                (
                    s["t"]
                    for s in samples
                    if s["t"] >= args.seconds and s["archived"] >= end["published"]
                ),
                None,
            )
            while (
                drained_at is None
                and time.monotonic() - started < args.seconds + args.drain_timeout
            ):
                if archived_count(db_path) >= end["published"]:
                    drained_at = time.monotonic() - started
                    break
                time.sleep(0.5)
            final = {"archived": archived_count(db_path), **proc_stats(controller.pid)}
            sim.stdin.write("stop\n")
            sim.stdin.flush()
            minute_ago = next((s for s in samples if s["t"] >= args.seconds - 60), samples[0])
            at_seconds = (
                next(s for s in samples if s["t"] >= args.seconds)
                if any(s["t"] >= args.seconds for s in samples)
                else samples[-1]
            )
            result = {
                "agents": args.agents,
                "seconds": args.seconds,
                "rate_per_agent": args.rate,
                "file_bytes": ready["file_bytes"],
                "published": end["published"],
                "archived_at_end": at_seconds["archived"],
                "files_per_s_overall": round(at_seconds["archived"] / at_seconds["t"], 2),
                "files_per_s_last_minute": round(
                    (at_seconds["archived"] - minute_ago["archived"])
                    / max(1e-9, at_seconds["t"] - minute_ago["t"]),
                    2,
                ),
                "offered_per_s": args.agents * args.rate,
                "backlog_at_end": end["published"] - at_seconds["archived"],
                "drain_s_after_end": (
                    round(max(0.0, drained_at - args.seconds), 1) if drained_at else None
                ),
                "archived_final": final["archived"],
                "controller_rss_mib_at_end": round(at_seconds["VmRSS"], 1),
                "controller_peak_rss_mib": round(final["VmHWM"], 1),
                "controller_cpu_s": round(end["cpu_s"], 1),
                "controller_cpu_percent_of_one_core": round(100 * end["cpu_s"] / end["t"], 1),
                "load_1m_at_end": os.getloadavg()[0],
                "cores": os.cpu_count(),
            }
            print(json.dumps(result, indent=2))
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps({"result": result, "samples": samples}, indent=1))
            errors = [
                line
                for line in (workdir / "controller.log").read_text(errors="replace").splitlines()
                if "ERROR" in line or "Traceback" in line
            ]
            print(f"controller log: {len(errors)} error lines", *errors[:5], sep="\n")
        finally:
            for proc in (controller, sim):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            broker.stop()


if __name__ == "__main__":
    main()
