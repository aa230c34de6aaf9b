"""A fleet under load, end to end: files/s, end-to-end latency and every process's memory.

    python3 bench/load_fleet.py [--agents 20] [--seconds 600] [--rate 1.0]

The pieces of `bench/controller_load.py`, reused as they are: its simulated agents (one child
process, `controller_load.py --simulate`: per agent the agent's own `EventStore`, `WsServer`
and MQTT connection as its own broker user, publishing an `end` message per event for a real
WAV written into the store), Mosquitto with the project's configuration, and the real
`python3 -m controller run`. What this adds to that benchmark (which reports throughput and the
controller's memory):

- end-to-end latency of every event: from the file being complete in the agent's store (the
  simulated agent writes it at its `onset_time`) to `archived_at` (verified, renamed, sidecar
  written) in the controller's database; p50 / p95 / p99 / max;
- the memory (VmRSS) of every process, the broker, the simulated agents and the controller,
  sampled every few seconds: at the start (after a warm-up), at the end of the production,
  its peak, and the growth between start and end;
- the ledger at the end: events published (PUBACK received) against files archived.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.controller_load import TOKEN, archived_count, proc_stats, published_count  # noqa: E402
from bench.mqtt_latency import percentile  # noqa: E402

OUT = REPO / "bench" / "out" / "load_fleet.json"
WARMUP_S = 10.0
SAMPLE_EVERY_S = 5.0


def latencies_ms(db_path: Path) -> list[float]:
    """archived_at - onset_time of every archived event, in ms."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT onset_time, archived_at FROM events WHERE state = 'archived'"
        ).fetchall()
    return [
        (datetime.fromisoformat(archived) - datetime.fromisoformat(onset)).total_seconds() * 1000
        for onset, archived in rows
        if archived
    ]


def devices_known(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn,
    ):
        return int(conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0])
    return 0


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    return {name: round(proc_stats(pid)["VmRSS"], 1) for name, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=1.0, help="events per second per agent")
    parser.add_argument("--event-seconds", type=float, default=3.0)
    parser.add_argument("--samplerate", type=int, default=16000)
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    args = parser.parse_args()

    from tests.fixtures.broker import USERS, Broker, free_port

    password = "sim-secret"
    with tempfile.TemporaryDirectory(prefix="load-fleet-") as tmp:
        workdir = Path(tmp)
        (workdir / "broker").mkdir()
        users = dict(USERS) | {f"sim-{i:02d}": password for i in range(args.agents)}
        broker = Broker(workdir / "broker", free_port(), users=users)
        broker.prepare()
        broker.start()
        sim = controller = None
        try:
            sim = subprocess.Popen(
                [sys.executable, str(REPO / "bench" / "controller_load.py"), "--simulate",
                 "--workdir", str(workdir), "--broker-port", str(broker.port),
                 "--password", password, "--agents", str(args.agents),
                 "--seconds", str(args.seconds), "--rate", str(args.rate),
                 "--event-seconds", str(args.event_seconds),
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
            deadline = time.monotonic() + 60
            while devices_known(db_path) < args.agents and time.monotonic() < deadline:
                time.sleep(0.5)
            assert broker.proc is not None
            pids = {"broker": broker.proc.pid, "agents": sim.pid, "controller": controller.pid}
            sim.stdin.write("go\n")
            sim.stdin.flush()
            started = time.monotonic()
            samples: list[dict[str, Any]] = []
            while time.monotonic() - started < args.seconds + 2.5:
                time.sleep(SAMPLE_EVERY_S)
                sample = {
                    "t": round(time.monotonic() - started, 1),
                    "published": published_count(workdir),
                    "archived": archived_count(db_path),
                    "rss_mib": rss_mib(pids),
                }
                samples.append(sample)
                if len(samples) % 12 == 0:
                    print(json.dumps(sample), flush=True)
            json.loads(sim.stdout.readline())  # done
            produced_s = time.monotonic() - started
            end_rss = rss_mib(pids)
            published = published_count(workdir)
            archived_in_time = archived_count(db_path)
            drain_deadline = time.monotonic() + args.drain_timeout
            while archived_count(db_path) < published and time.monotonic() < drain_deadline:
                time.sleep(0.5)
            drained_s = time.monotonic() - started - produced_s
            archived = archived_count(db_path)
            latencies = latencies_ms(db_path)
            sim.stdin.write("stop\n")
            sim.stdin.flush()

            start = next((s for s in samples if s["t"] >= WARMUP_S), samples[0])
            at_end = next((s for s in samples if s["t"] >= args.seconds), samples[-1])
            minute_ago = next((s for s in samples if s["t"] >= at_end["t"] - 60), samples[0])
            memory = {
                name: {
                    "start_mib": start["rss_mib"][name],
                    "end_mib": end_rss[name],
                    "peak_mib": max(s["rss_mib"][name] for s in samples),
                    "growth_mib": round(end_rss[name] - start["rss_mib"][name], 1),
                }
                for name in pids
            }
            result = {
                "agents": args.agents,
                "seconds": args.seconds,
                "rate_per_agent": args.rate,
                "offered_files_per_s": args.agents * args.rate,
                "file_bytes": ready["file_bytes"],
                "published": published,
                "archived": archived,
                "lost": published - archived,
                "files_per_s_during_production": round(at_end["archived"] / at_end["t"], 2),
                "files_per_s_last_minute": round(
                    (at_end["archived"] - minute_ago["archived"])
                    / max(1e-9, at_end["t"] - minute_ago["t"]),
                    2,
                ),
                "archived_when_production_ended": archived_in_time,
                "drain_s_after_production": round(drained_s, 1),
                "end_to_end_ms": {
                    "count": len(latencies),
                    "p50": round(percentile(latencies, 50), 1),
                    "p95": round(percentile(latencies, 95), 1),
                    "p99": round(percentile(latencies, 99), 1),
                    "max": round(max(latencies), 1),
                    "mean": round(statistics.fmean(latencies), 1),
                }
                if latencies
                else None,
                "memory": memory,
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
