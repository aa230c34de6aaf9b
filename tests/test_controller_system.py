"""End to end: two agents (`python3 -m edge run`) on the virtual microphone, a real Mosquitto
with the project's configuration, real websockets, and the controller collecting their files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.mqtt import Connection, run_subscriptions, stale_subscriptions
from controller.service import Controller
from controller.settings import ControllerMqttSettings, ControllerSettings
from tests.fixtures.broker import Broker, free_port
from tests.fixtures.virtual_mic import DEVICE_NAME, VirtualMic

pytestmark = [pytest.mark.system, pytest.mark.slow]

TOKEN = "fleet-token-for-tests"
DEVICES = ("dev-a", "dev-b")
TIMEOUT_S = 60.0  # generous: a loaded 2-core machine runs pulseaudio, 2 agents and a broker


class AgentProcess:
    """`python3 -m edge run` as one device, with its websocket server on a free port."""

    def __init__(self, device_id: str, data_dir: Path, broker: Broker) -> None:
        self.device_id = device_id
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{device_id}-agent.log"
        self.ws_port = free_port()
        env = broker.env(device_id)
        env.update(
            SOUNDEDGE_DEVICE_ID=device_id,
            SOUNDEDGE_DATA_DIR=str(data_dir),
            SOUNDEDGE_AUDIO__DEVICE=DEVICE_NAME,
            SOUNDEDGE_WS__HOST="127.0.0.1",
            SOUNDEDGE_WS__PORT=str(self.ws_port),
            SOUNDEDGE_WS__PUBLIC_URL=f"ws://127.0.0.1:{self.ws_port}",
            SOUNDEDGE_WS__TOKEN=TOKEN,
            SOUNDEDGE_RECORDING__PRE_ROLL_S="0.5",
            SOUNDEDGE_RECORDING__POST_ROLL_S="0.5",
            SOUNDEDGE_MQTT__HEALTH_INTERVAL_S="2",
            SOUNDEDGE_MQTT__LEVEL_INTERVAL_S="0",
            SOUNDEDGE_MQTT__DISCOVERY="false",
            SOUNDEDGE_MQTT__RECONNECT_MIN_S="0.2",
            SOUNDEDGE_MQTT__RECONNECT_MAX_S="2",
        )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Read now: the virtual microphone sets PULSE_SERVER in os.environ.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run"], env=env, stdout=log, stderr=log
            )

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        """The finished events in the agent's own event log."""
        log = self.data_dir / "events.jsonl"
        if not log.exists():
            return []
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [line["record"] for line in lines if line["kind"] == "event"]

    def collected(self) -> set[str]:
        """Event ids a controller acked."""
        log = self.data_dir / "events.jsonl"
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return {line["event_id"] for line in lines if line["kind"] == "collected"}


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def agents(tmp_path: Path, broker: Broker, virtual_mic: VirtualMic) -> Iterator[list[AgentProcess]]:
    """Two agents capturing from the same virtual microphone, both listening."""
    fleet = [AgentProcess(d, tmp_path / d, broker) for d in DEVICES]
    for agent in fleet:
        agent.start()
    try:
        wait_until(
            lambda: all("capturing from" in a.output() for a in fleet), "the agents to capture"
        )
        time.sleep(2.0)  # let the noise floors settle on the silence stream
        yield fleet
    finally:
        for agent in fleet:
            agent.stop()


def play_until_recorded(
    agents: list[AgentProcess], mic: VirtualMic, tone: Path, total_each: int
) -> None:
    """Play `tone` until every agent logged `total_each` events (a missed play is repeated)."""
    for _ in range(3 * total_each):
        counts = [len(a.records()) for a in agents]
        if min(counts) >= total_each:
            return
        mic.play(tone)
        deadline = time.monotonic() + 4.0
        while [len(a.records()) for a in agents] == counts and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.6)
    raise AssertionError(f"only {[len(a.records()) for a in agents]} events recorded")


def settings_for(
    broker: Broker, archive: Path, name: str = "ctl", **overrides: Any
) -> ControllerSettings:
    values: dict[str, Any] = {
        "controller_id": name,
        "archive_dir": archive,
        "db_path": archive.parent / f"{name}.db",
        "ws_token": TOKEN,
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "username": "controller",
            "password": broker.users["controller"],
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 2.0,
        },
        "collector": {"retry_min_s": 0.2, "retry_max_s": 2.0, "catchup_interval_s": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return ControllerSettings(**values)


@contextlib.asynccontextmanager
async def running(settings: ControllerSettings) -> AsyncIterator[Controller]:
    controller = Controller(settings)
    task = asyncio.create_task(controller.run(), name=f"controller {settings.controller_id}")
    try:
        async with asyncio.timeout(TIMEOUT_S):
            started = asyncio.ensure_future(controller.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
        if task.done():
            task.result()
        yield controller
    finally:
        controller.request_stop()
        async with asyncio.timeout(TIMEOUT_S):
            await task


def archived_ids(archive: Path) -> dict[str, dict[str, Any]]:
    """Sidecars in the archive by event id (hidden and temporary files are not sidecars)."""
    found = {}
    for sidecar in archive.glob("*/*/*.json"):
        if not sidecar.name.startswith("."):
            document = json.loads(sidecar.read_text())
            found[document["event_id"]] = document
    return found


async def eventually(condition: Callable[[], bool], interval_s: float = 0.2) -> None:
    """Poll `condition` (in a thread: it reads files) until it holds, bounded by TIMEOUT_S."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            if await asyncio.to_thread(condition):
                return
            await asyncio.sleep(interval_s)


async def wait_archived(archive: Path, agents: list[AgentProcess]) -> None:
    """Until every event the agents logged is in the archive."""
    wanted = {r["event_id"] for a in agents for r in a.records()}
    await eventually(lambda: wanted <= set(archived_ids(archive)))


def check_archive(archive: Path, agents: list[AgentProcess]) -> None:
    """Every logged event is archived once, verified, with a sidecar; nothing half-written."""
    sidecars = archived_ids(archive)
    for agent in agents:
        for record in agent.records():
            sidecar = sidecars[record["event_id"]]
            day = record["onset_time"][:10]
            path = archive / agent.device_id / day / record["file"]["name"]
            data = path.read_bytes()
            assert len(data) == record["file"]["size_bytes"]
            assert hashlib.sha256(data).hexdigest() == record["file"]["sha256"]
            assert sidecar["sha256_verified"] is True
            assert sidecar["seq"] == record["seq"]
            assert sidecar["file"] == record["file"]
    leftovers = [p for p in archive.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert leftovers == []


async def play(agents: list[AgentProcess], mic: VirtualMic, total_each: int) -> None:
    tone = mic.write_tone("tone.wav", seconds=0.5, amplitude=0.4)
    await asyncio.to_thread(play_until_recorded, agents, mic, tone, total_each)


async def test_sounds_from_two_agents_end_up_verified_in_the_archive(
    tmp_path: Path, broker: Broker, agents: list[AgentProcess], virtual_mic: VirtualMic
) -> None:
    archive = tmp_path / "archive"
    async with running(settings_for(broker, archive)) as controller:
        await play(agents, virtual_mic, 2)
        await wait_archived(archive, agents)
        await eventually(lambda: all(len(a.collected()) == 2 for a in agents))
        devices = {d.device_id: d for d in controller.db.devices()}
    check_archive(archive, agents)
    assert set(devices) == set(DEVICES)
    assert all(d.status == "online" for d in devices.values())
    assert controller.collector.stats.archived == 4


@pytest.mark.parametrize(
    "session_expiry_s",
    [
        pytest.param(0, id="clean-session-catch-up-only"),
        pytest.param(3600, id="persistent-session-and-catch-up"),
    ],
)
async def test_events_while_the_controller_is_away_are_collected_after_a_restart(
    tmp_path: Path,
    broker: Broker,
    agents: list[AgentProcess],
    virtual_mic: VirtualMic,
    session_expiry_s: int,
) -> None:
    archive = tmp_path / "archive"
    # With a clean session the broker queues nothing: only catch-up can find the events. With
    # a persistent one the queued `end` messages and the catch-up race: each file once.
    settings = settings_for(broker, archive, mqtt={"session_expiry_s": session_expiry_s})
    async with running(settings) as controller:
        await eventually(lambda: len(controller.db.devices()) == 2)
    await play(agents, virtual_mic, 5)
    assert [len(a.records()) for a in agents] == [5, 5]
    assert archived_ids(archive) == {}
    async with running(settings) as controller:
        await wait_archived(archive, agents)
    check_archive(archive, agents)
    assert controller.collector.stats.archived == 10


async def test_events_during_a_broker_outage_are_collected_when_it_returns(
    tmp_path: Path, broker: Broker, agents: list[AgentProcess], virtual_mic: VirtualMic
) -> None:
    archive = tmp_path / "archive"
    async with running(settings_for(broker, archive)) as controller:
        await eventually(lambda: len(controller.db.devices()) == 2)
        await asyncio.to_thread(broker.stop)
        await play(agents, virtual_mic, 2)
        await asyncio.to_thread(broker.start)
        await wait_archived(archive, agents)
    check_archive(archive, agents)
    assert controller.collector.stats.archived == 4


async def test_two_controllers_in_a_shared_group_collect_every_file_once(
    tmp_path: Path, broker: Broker, agents: list[AgentProcess], virtual_mic: VirtualMic
) -> None:
    archive = tmp_path / "archive"
    group = {"mqtt": {"shared_group": "archivers"}}
    first = settings_for(broker, archive, "ctl-1", **group)
    second = settings_for(broker, archive, "ctl-2", **group)
    # Events from before the controllers start: both catch up the same history at once.
    await play(agents, virtual_mic, 2)
    async with running(first) as one, running(second) as two:
        await play(agents, virtual_mic, 5)
        await wait_archived(archive, agents)
    check_archive(archive, agents)
    stats = one.collector.stats, two.collector.stats
    assert stats[0].archived + stats[1].archived == 10, stats
    assert stats[0].archived > 0, stats
    assert stats[1].archived > 0, stats


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


def cli_env(broker: Broker, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    env.update(
        SOUNDEDGE_CONTROLLER_CONTROLLER_ID="ctl-cli",
        SOUNDEDGE_CONTROLLER_ARCHIVE_DIR=str(tmp_path / "archive"),
        SOUNDEDGE_CONTROLLER_DB_PATH=str(tmp_path / "ctl.db"),
        SOUNDEDGE_CONTROLLER_WS_TOKENS=json.dumps(dict.fromkeys(DEVICES, TOKEN)),
        SOUNDEDGE_CONTROLLER_MQTT__HOST=broker.host,
        SOUNDEDGE_CONTROLLER_MQTT__PORT=str(broker.port),
        SOUNDEDGE_CONTROLLER_MQTT__USERNAME="controller",
        SOUNDEDGE_CONTROLLER_MQTT__PASSWORD=broker.users["controller"],
        SOUNDEDGE_CONTROLLER_COLLECTOR__RETRY_MIN_S="0.2",
    )
    return env


def publish_as(broker: Broker, user: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish raw payloads as `user` (QoS 1, confirmed)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(user, broker.users[user])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(timeout=TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()


def read_datagrams(sock: socket.socket, into: list[bytes]) -> None:
    """Keep the notify socket drained (its queue is short) until it is closed."""
    while True:
        try:
            into.append(sock.recv(4096))
        except TimeoutError:
            continue
        except OSError:
            return


def test_cli_run_devices_events_fetch_and_set(
    tmp_path: Path, broker: Broker, agents: list[AgentProcess], virtual_mic: VirtualMic
) -> None:
    env = cli_env(broker, tmp_path)
    archive = tmp_path / "archive"
    log_path = tmp_path / "controller.log"
    # As under systemd (Type=notify, WatchdogSec=): readiness and watchdog pings.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(1.0)
    datagrams: list[bytes] = []
    reader = threading.Thread(target=read_datagrams, args=(notify, datagrams), daemon=True)
    reader.start()
    run_env = env | {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    with log_path.open("wb") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "controller", "run"], env=run_env, stdout=log, stderr=log
        )
    processes: list[subprocess.Popen[str]] = []  # others to clean up if the test fails
    try:
        wait_until(lambda: b"WATCHDOG=1" in datagrams, "a watchdog ping")
        assert datagrams[0].startswith(b"READY=1")
        wait_until(lambda: "dev-b is online" in log_path.read_text(), "the controller")
        # Bad input on the subscribed topics: logged, dropped, the controller goes on.
        publish_as(broker, "dev-a", [
            ("soundedge/dev-a/event", b"not json"),
            ("soundedge/dev-a/event", b'{"type": "end", "event_id": "x"}'),
            ("soundedge/dev-a/status", b"banana"),
        ])  # fmt: skip
        tail_err = tmp_path / "tail.err"
        with tail_err.open("wb") as err:
            tail = subprocess.Popen(
                [sys.executable, "-m", "controller", "tail", "--device", "dev-b", "--count", "2"],
                env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        processes.append(tail)
        wait_until(lambda: "listening for events" in tail_err.read_text(), "tail")
        tone = virtual_mic.write_tone("tone.wav", seconds=0.5, amplitude=0.4)
        play_until_recorded(agents, virtual_mic, tone, 1)
        wanted = {r["event_id"] for a in agents for r in a.records()}
        wait_until(lambda: wanted <= set(archived_ids(archive)), "the files")
        tailed, _ = tail.communicate(timeout=TIMEOUT_S)
        assert tail.returncode == 0
        first = agents[1].records()[0]
        assert [line.split()[1:5] for line in tailed.splitlines()] == [
            ["dev-b", "start", "seq", "1"],
            ["dev-b", "end", "seq", "1"],
        ]
        assert first["event_id"] in tailed

        devices = cli(env, "devices")
        assert devices.returncode == 0, devices.stderr
        lines = devices.stdout.splitlines()
        assert lines[0].split()[:2] == ["id", "status"]
        assert {line.split()[0]: line.split()[1] for line in lines[1:]} == {
            "dev-a": "online",
            "dev-b": "online",
        }

        record = agents[0].records()[0]
        events = cli(env, "events", "--device", "dev-a", "--since", "1h")
        assert events.returncode == 0, events.stderr
        assert record["event_id"] in events.stdout
        assert "dev-b" not in events.stdout

        # fetch collects again what is no longer in the archive.
        path = archive / "dev-a" / record["onset_time"][:10] / record["file"]["name"]
        path.unlink()
        path.with_name(path.name + ".json").unlink()
        fetched = cli(env, "fetch", record["event_id"])
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.strip() == str(path)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["file"]["sha256"]

        applied = cli(env, "set", "dev-a", "detector.threshold_db=8")
        assert applied.returncode == 0, applied.stderr
        assert '"threshold_db": 8.0' in applied.stdout
        refused = cli(env, "set", "dev-a", "detector.threshold_db=500")
        assert refused.returncode == 1
        assert "threshold_db" in refused.stderr
        unknown = cli(env, "set", "dev-a", "detector.no_such_setting=1")
        assert unknown.returncode == 1
        assert "no_such_setting" in unknown.stderr
        # MQTT 3.1.1 has no reply topics: the device's `config` answers instead.
        v311 = env | {"SOUNDEDGE_CONTROLLER_MQTT__PROTOCOL": "3.1.1"}
        applied = cli(v311, "set", "dev-a", "detector.threshold_db=9")
        assert applied.returncode == 0, applied.stderr
        assert '"threshold_db": 9.0' in applied.stdout
        refused = cli(v311, "set", "dev-a", "detector.threshold_db=501")
        assert refused.returncode == 1
        assert "threshold_db" in refused.stderr
    finally:
        for leftover in processes:
            if leftover.poll() is None:
                leftover.kill()
                leftover.wait(timeout=TIMEOUT_S)
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=TIMEOUT_S)
    try:
        wait_until(lambda: any(d.startswith(b"STOPPING=1") for d in datagrams), "STOPPING=1")
    finally:
        notify.close()
        reader.join(timeout=5)
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output
    assert "ignoring a message on soundedge/dev-a/event" in output
    assert "ignoring a message on soundedge/dev-a/status" in output


def test_a_refused_mqtt_login_stops_run_with_one_clear_line(tmp_path: Path, broker: Broker) -> None:
    env = cli_env(broker, tmp_path)
    env["SOUNDEDGE_CONTROLLER_MQTT__PASSWORD"] = "wrong"
    result = cli(env, "run")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("soundedge-controller: error:")
    assert "refused the login" in last
    assert "SOUNDEDGE_CONTROLLER_MQTT__PASSWORD" in result.stderr
    assert "Traceback" not in result.stderr


def test_set_to_a_device_that_does_not_answer_exits_3(tmp_path: Path, broker: Broker) -> None:
    result = cli(cli_env(broker, tmp_path), "set", "dev-a", "enabled=false", "--timeout", "1")
    assert result.returncode == 3
    assert "did not answer within 1 s" in result.stderr


async def test_joining_a_group_drops_the_old_event_subscription_of_the_session(
    broker: Broker,
) -> None:
    """A persistent session keeps its subscriptions: without the cleanup, a controller moved
    into a group would get each event twice (plain and shared)."""
    base = {"host": broker.host, "port": broker.port, "username": "controller"}
    base["password"] = broker.users["controller"]
    plain = ControllerMqttSettings(**base)
    grouped = ControllerMqttSettings(**base, shared_group="archivers")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT_S):
        before = Connection(plain, "ctl-moved", loop, persistent=True)
        await before.open()
        await before.subscribe(run_subscriptions(plain))
        await before.close()
        after = Connection(grouped, "ctl-moved", loop, persistent=True)
        await after.open()
        try:
            await after.unsubscribe(stale_subscriptions(grouped))
            await after.subscribe(run_subscriptions(grouped))
            await asyncio.to_thread(publish_as, broker, "dev-a", [("soundedge/dev-a/event", b"{}")])
            first = await after.messages.get()
            first.ack()
            await asyncio.sleep(1.0)  # a second copy would have arrived by now
            assert after.messages.empty()
        finally:
            await after.close()
