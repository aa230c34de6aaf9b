"""Agent cost: CPU and memory of `soundedge run` capturing live, against a bare PortAudio capture.

A private PulseAudio server (the tests' virtual microphone) provides the capture device `pulse`;
a tone is played into it every 3-5 s so that the agent writes an event file every few seconds.
In the same run, a peer process captures the same device with `sounddevice.InputStream` and a
callback that does nothing: the floor that any Python capture pays. Both are measured from
/proc/<pid> over the same window, after start-up: CPU seconds (user + system) per second of
audio, as % of one core, and peak resident memory (VmHWM, start-up included). Overflows come
from the agent's shutdown log line and the peer's own count of PortAudio's input-overflow flag.
MQTT and the websocket server are off, unless `--with-mqtt-ws`: then the agent also runs as
deployed, connected to a local Mosquitto (the project's configuration, as device user `dev-a`)
and with its websocket server listening.

    python3 -m bench.agent_cost --minutes 10
    python3 -m bench.agent_cost --minutes 2 --channels 2
    python3 -m bench.agent_cost --minutes 10 --with-mqtt-ws
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.fixtures.agent_process import AgentProcess, clean_env
from tests.fixtures.broker import Broker, free_port
from tests.fixtures.virtual_mic import DEVICE_NAME, start_virtual_mic

OUT_DIR = Path(__file__).resolve().parent / "out"
SAMPLERATE = 48000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The peer: PortAudio capture of the same device, a callback that only counts overflow flags.
PEER = """
import signal, sys, threading, sounddevice as sd
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
overflows = 0
def callback(indata, frames, time, status):
    global overflows
    if status.input_overflow:
        overflows += 1
with sd.InputStream(device=sys.argv[1], channels=int(sys.argv[2]), samplerate=48000,
                    blocksize=1024, dtype="float32", latency="high", callback=callback):
    print("capturing", flush=True)
    stop.wait()
print(f"input overflows: {overflows}", flush=True)
"""


@dataclass
class ProcessCost:
    name: str
    cpu_percent_of_core: float  # CPU seconds per second of audio × 100
    cpu_s: float
    window_s: float
    vm_hwm_mib: float  # peak resident
    vm_rss_mib: float  # resident at the end of the window
    overflows: int | None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime per thread, keyed "tid name" (the main thread runs the event loop)."""
    result = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        result[f"{task.name} {name}"] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return result


def status_mib(pid: int, key: str) -> float:
    """A memory line of /proc/<pid>/status in MiB: VmHWM (peak resident), VmRSS (now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for pid {pid}")


def run(
    minutes: float,
    channels: int,
    seed: int,
    process_interval_s: float | None = None,
    extra_env: dict[str, str] | None = None,
    with_mqtt_ws: bool = False,
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="agent-cost-") as tmp:
        workdir = Path(tmp)
        mic = start_virtual_mic(workdir)
        agent: AgentProcess | None = None
        peer: AgentProcess | None = None
        broker: Broker | None = None
        try:
            tone = mic.write_tone("tone.wav", seconds=0.5, frequency_hz=1000.0, amplitude=0.3)
            env = clean_env(
                SOUNDEDGE_DEVICE_ID="dev-a" if with_mqtt_ws else "costpi",
                SOUNDEDGE_DATA_DIR=str(workdir / "data"),
                SOUNDEDGE_AUDIO__DEVICE=DEVICE_NAME,
                SOUNDEDGE_AUDIO__SAMPLERATE=str(SAMPLERATE),
                SOUNDEDGE_AUDIO__CHANNELS=str(channels),
                SOUNDEDGE_MQTT__ENABLED="false",
                SOUNDEDGE_WS__ENABLED="false",
            )
            if with_mqtt_ws:
                (workdir / "broker").mkdir()
                broker = Broker(workdir / "broker", free_port())
                broker.prepare()
                broker.start()
                env.update(broker.env("dev-a"))
                env.update(
                    SOUNDEDGE_MQTT__ENABLED="true",
                    SOUNDEDGE_WS__ENABLED="true",
                    SOUNDEDGE_WS__PORT=str(free_port()),
                    SOUNDEDGE_WS__TOKEN="cost-bench-token",
                )
            if process_interval_s is not None:
                env["SOUNDEDGE_AUDIO__PROCESS_INTERVAL_S"] = str(process_interval_s)
            env.update(extra_env or {})
            agent = AgentProcess.agent(env)
            peer = AgentProcess(
                [sys.executable, "-c", PEER, DEVICE_NAME, str(channels)], clean_env()
            )
            agent.wait_for_line("capturing from pulse", timeout_s=60)
            peer.wait_for_line("capturing", timeout_s=60)
            time.sleep(2.0)  # past start-up: imports, device probing, the first blocks
            pids = {"agent": agent.process.pid, "peer": peer.process.pid}
            start_cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            start_threads = {name: thread_cpu_seconds(pid) for name, pid in pids.items()}
            started = time.monotonic()
            deadline = started + minutes * 60
            rng = random.Random(seed)
            played = 0
            while time.monotonic() < deadline:
                mic.play(tone, wait=False)
                played += 1
                time.sleep(min(rng.uniform(3.0, 5.0), max(0.0, deadline - time.monotonic())))
            window_s = time.monotonic() - started
            end_cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            end_threads = {name: thread_cpu_seconds(pid) for name, pid in pids.items()}
            hwm = {name: status_mib(pid, "VmHWM") for name, pid in pids.items()}
            rss = {name: status_mib(pid, "VmRSS") for name, pid in pids.items()}
        finally:
            for proc in (agent, peer):
                if proc is not None:
                    proc.stop()
            mic.stop()
            if broker is not None:
                broker.stop()
        assert agent is not None
        assert peer is not None
        results = []
        for name, proc in (("agent", agent), ("peer", peer)):
            cpu = end_cpu[name] - start_cpu[name]
            results.append(
                ProcessCost(
                    name=name,
                    cpu_percent_of_core=round(100 * cpu / window_s, 3),
                    cpu_s=round(cpu, 2),
                    window_s=round(window_s, 1),
                    vm_hwm_mib=round(hwm[name], 1),
                    vm_rss_mib=round(rss[name], 1),
                    overflows=_overflows(proc.output),
                )
            )
        events = re.search(r"stopped; (\d+) events recorded", agent.output)
        return {
            "channels": channels,
            "mqtt_and_websocket": with_mqtt_ws,
            "samplerate": SAMPLERATE,
            "minutes": minutes,
            "tones_played": played,
            "events_recorded": int(events.group(1)) if events else None,
            "agent_exit_status": agent.process.returncode,
            "load_average_at_end": os.getloadavg(),
            "processes": [asdict(r) for r in results],
            # % of one core per thread over the window (the first tid is the main thread: the
            # agent's event loop).
            "threads_percent": {
                name: {
                    key: round(100 * (end[key] - start_threads[name].get(key, 0.0)) / window_s, 2)
                    for key in sorted(end, key=lambda k: int(k.split()[0]))
                }
                for name, end in end_threads.items()
            },
            "cpu_ratio_agent_to_peer": round(
                results[0].cpu_percent_of_core / max(results[1].cpu_percent_of_core, 1e-9), 2
            ),
        }


def _overflows(output: str) -> int | None:
    found = re.search(r"input overflows: (\d+)", output)
    return int(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="measured window")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 2))
    parser.add_argument("--seed", type=int, default=1, help="seed of the 3-5 s tone intervals")
    parser.add_argument(
        "--process-interval-s",
        type=float,
        help="SOUNDEDGE_AUDIO__PROCESS_INTERVAL_S (default: the agent's own default)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra environment variable for the agent (repeatable)",
    )
    parser.add_argument(
        "--with-mqtt-ws",
        action="store_true",
        help="MQTT (to a local Mosquitto) and the websocket server on, as deployed",
    )
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.env)
    result = run(
        args.minutes,
        args.channels,
        args.seed,
        args.process_interval_s,
        extra_env,
        with_mqtt_ws=args.with_mqtt_ws,
    )
    result["extra_env"] = extra_env
    OUT_DIR.mkdir(exist_ok=True)
    suffix = "_mqtt_ws" if args.with_mqtt_ws else ""
    out = OUT_DIR / f"agent_cost_{args.channels}ch{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
