"""Controller latency: an event's end to its file verified in the archive, on loopback.

    python3 bench/controller_latency.py [--events 30]

The real agent (`python3 -m edge run`, websocket on) captures tones played into the PulseAudio
virtual microphone; Mosquitto with the project's configuration; the real controller
(`python3 -m controller run`). Same machine, same wall clock. For every event:

- end → archived: from the last sample of the event's file (`offset_time + post_roll_s`, the
  agent's capture clock) to `archived_at` in the sidecar (the file verified and renamed, the
  sidecar written). This is the whole chain: the agent finishing the file (its audio latency
  included), MQTT, the controller's download and checks.
- end → message: the agent's and MQTT's share (the difference of the two above).
- message → archived: from the controller receiving the `end` message (`received_at` in its
  database) to `archived_at`: the controller's own share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mqtt_latency import percentile  # noqa: E402
from tests.fixtures.broker import Broker, free_port  # noqa: E402
from tests.fixtures.virtual_mic import DEVICE_NAME, start_virtual_mic  # noqa: E402

TOKEN = "bench-token"
OUT = REPO / "bench" / "out" / "controller_latency.json"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def events_logged(data_dir: Path) -> list[dict[str, object]]:
    log = data_dir / "events.jsonl"
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [line["record"] for line in lines if line["kind"] == "event"]


def sidecars(archive: Path) -> dict[str, dict[str, object]]:
    found = {}
    for path in archive.glob("*/*/*.json"):
        if not path.name.startswith("."):
            document = json.loads(path.read_text())
            found[str(document["event_id"])] = document
    return found


def received_times(db_path: Path) -> dict[str, datetime]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT event_id, received_at FROM events").fetchall()
    return {event_id: parse_time(at) for event_id, at in rows}


def wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="controller-latency-") as tmp:
        workdir = Path(tmp)
        for name in ("broker", "pulse"):
            (workdir / name).mkdir()
        broker = Broker(workdir / "broker", free_port())
        broker.prepare()
        broker.start()
        mic = start_virtual_mic(workdir / "pulse")
        data_dir, archive, db_path = workdir / "agent", workdir / "archive", workdir / "ctl.db"
        ws_port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
        agent_env = (
            base
            | broker.env("dev-a")
            | {
                "SOUNDEDGE_DEVICE_ID": "dev-a",
                "SOUNDEDGE_DATA_DIR": str(data_dir),
                "SOUNDEDGE_AUDIO__DEVICE": DEVICE_NAME,
                "SOUNDEDGE_WS__HOST": "127.0.0.1",
                "SOUNDEDGE_WS__PORT": str(ws_port),
                "SOUNDEDGE_WS__PUBLIC_URL": f"ws://127.0.0.1:{ws_port}",
                "SOUNDEDGE_WS__TOKEN": TOKEN,
                "SOUNDEDGE_MQTT__DISCOVERY": "false",
                "SOUNDEDGE_RECORDING__PRE_ROLL_S": "1.0",
                "SOUNDEDGE_RECORDING__POST_ROLL_S": "1.0",
            }
        )
        controller_env = base | {
            "SOUNDEDGE_CONTROLLER_ARCHIVE_DIR": str(archive),
            "SOUNDEDGE_CONTROLLER_DB_PATH": str(db_path),
            "SOUNDEDGE_CONTROLLER_WS_TOKEN": TOKEN,
            "SOUNDEDGE_CONTROLLER_MQTT__HOST": broker.host,
            "SOUNDEDGE_CONTROLLER_MQTT__PORT": str(broker.port),
            "SOUNDEDGE_CONTROLLER_MQTT__USERNAME": "controller",
            "SOUNDEDGE_CONTROLLER_MQTT__PASSWORD": broker.users["controller"],
        }
        agent_log = (workdir / "agent.log").open("wb")
        controller_log = (workdir / "controller.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge", "run"], env=agent_env, stdout=agent_log,
            stderr=agent_log, cwd=REPO,
        )  # fmt: skip
        controller = subprocess.Popen(
            [sys.executable, "-m", "controller", "run"], env=controller_env,
            stdout=controller_log, stderr=controller_log, cwd=REPO,
        )  # fmt: skip
        try:
            wait(
                lambda: "capturing from" in (workdir / "agent.log").read_text(errors="replace"),
                60,
                "the agent",
            )
            time.sleep(2.0)  # noise floor
            tone = mic.write_tone("tone.wav", seconds=0.5, amplitude=0.4)
            for _ in range(args.events):
                mic.play(tone)
                time.sleep(1.5)  # hang + post-roll: one event per tone
            wait(
                lambda: (
                    {str(r["event_id"]) for r in events_logged(data_dir)} <= set(sidecars(archive))
                ),
                120,
                "the archive",
            )
            records = events_logged(data_dir)
            archived = sidecars(archive)
            received = received_times(db_path)
            whole, own = [], []
            for record in records:
                event_id = str(record["event_id"])
                file_end = parse_time(str(record["offset_time"])) + timedelta(
                    seconds=float(record["post_roll_s"])  # type: ignore[arg-type]
                )
                done = parse_time(str(archived[event_id]["archived_at"]))
                whole.append((done - file_end).total_seconds() * 1000)
                own.append((done - received[event_id]).total_seconds() * 1000)
            result = {
                "events": len(records),
                "file_bytes_median": statistics.median(
                    int(r["file"]["size_bytes"])  # type: ignore[index]
                    for r in records
                ),
                "end_to_archived_ms": {
                    "p50": round(percentile(whole, 50), 1),
                    "p95": round(percentile(whole, 95), 1),
                    "max": round(max(whole), 1),
                },
                "end_to_message_ms": {
                    "p50": round(
                        percentile([w - o for w, o in zip(whole, own, strict=True)], 50), 1
                    ),
                    "p95": round(
                        percentile([w - o for w, o in zip(whole, own, strict=True)], 95), 1
                    ),
                },
                "message_to_archived_ms": {
                    "p50": round(percentile(own, 50), 1),
                    "p95": round(percentile(own, 95), 1),
                    "max": round(max(own), 1),
                },
                "load_1m": os.getloadavg()[0],
                "cores": os.cpu_count(),
            }
            print(json.dumps(result, indent=2))
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps({"result": result, "end_ms": whole, "own_ms": own}))
        finally:
            for proc in (controller, agent):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            mic.stop()
            broker.stop()


if __name__ == "__main__":
    main()
