"""sd_notify and the service watchdog against a real datagram socket the test binds."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.agent import Agent
from edge.capture import FileSource
from edge.sdnotify import SdNotifier, watchdog_interval_s
from edge.settings import AgentSettings
from edge.state import AgentState
from edge.watchdog import ServiceHeartbeat, ServiceWatchdog

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sd_notify is POSIX only")

TIMEOUT_S = 10.0


class NotifySocket:
    """What systemd does: a bound AF_UNIX datagram socket collecting notifications."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def recv_now(self) -> list[dict[str, str]]:
        """Every datagram that has arrived, parsed into KEY=VALUE maps."""
        got = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            got.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        self.messages += got
        return got

    async def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], after: int = 0
    ) -> dict[str, str]:
        """The first message from index `after` on (received or to come) that matches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        seen = after
        while True:
            self.recv_now()
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            if loop.time() > deadline:
                raise AssertionError(f"no matching notification; got {self.messages}")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # AF_UNIX paths are limited to 108 bytes: a short directory rather than tmp_path.
    directory = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    listener = NotifySocket(str(directory / "notify"))
    yield listener
    listener.close()
    (directory / "notify").unlink(missing_ok=True)
    directory.rmdir()


def test_notify_sends_one_datagram_per_call(notify_socket: NotifySocket) -> None:
    notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled
    assert notifier.ready("capturing from\nUSB card")
    assert notifier.watchdog()
    assert notifier.stopping()
    notifier.close()
    assert notify_socket.recv_now() == [
        {"READY": "1", "STATUS": "capturing from USB card"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
    ]


def test_abstract_namespace_socket() -> None:
    listener = NotifySocket(f"@soundedge-test-{uuid.uuid4().hex}")
    try:
        notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": listener.address})
        assert notifier.ready()
        notifier.close()
        assert listener.recv_now() == [{"READY": "1"}]
    finally:
        listener.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SdNotifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    notifier.close()


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": "/nonexistent/soundedge/notify"})
    assert notifier.enabled
    assert not notifier.watchdog()
    assert not notifier.watchdog()  # warned once, still no exception
    notifier.close()
    unsupported = SdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not unsupported.enabled


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    pid = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid}) == 1.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


class FakeClock:
    """A monotonic clock the test moves; counts how often the watchdog looked at it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now

    async def wait_calls(self, count: int) -> None:
        target = self.calls + count
        async with asyncio.timeout(TIMEOUT_S):
            while self.calls < target:
                await asyncio.sleep(0.005)


def _is_ping(message: dict[str, str]) -> bool:
    return message.get("WATCHDOG") == "1"


async def test_watchdog_pings_only_while_audio_flows(notify_socket: NotifySocket) -> None:
    state = AgentState()
    clock = FakeClock()
    watchdog = ServiceWatchdog(
        state,
        stall_s=5.0,
        notifier=SdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.address}),
        interval_s=0.02,  # real seconds between looks; pings follow the fake clock
        clock=clock,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog.run(stop))

    # Not ready while the stream is still being opened.
    await clock.wait_calls(3)
    assert notify_socket.recv_now() == []

    state.capture_state = "running"
    state.device_name = "virtual mic"
    state.last_block_monotonic = clock.now
    ready = await notify_socket.wait_for(lambda m: "READY" in m)
    assert ready["STATUS"] == "capturing from virtual mic"
    await notify_socket.wait_for(_is_ping)

    # Blocks keep coming: pings continue as time goes on.
    for _ in range(3):
        before = len(notify_socket.messages)
        clock.now += 1.0
        state.last_block_monotonic = clock.now
        await notify_socket.wait_for(_is_ping, after=before)

    # The pipeline stops processing blocks while capture claims to run: a stall.
    clock.now += 6.0
    stalled_at = len(notify_socket.messages)
    await notify_socket.wait_for(
        lambda m: m.get("STATUS", "").startswith("audio stalled"), after=stalled_at
    )
    for _ in range(3):  # time passes, the watchdog looks again and again, never pings
        clock.now += 1.0
        await clock.wait_calls(4)
    notify_socket.recv_now()
    assert not any(_is_ping(m) for m in notify_socket.messages[stalled_at:])
    assert not task.done()

    # Audio flows again: pings resume.
    resumed_at = len(notify_socket.messages)
    state.last_block_monotonic = clock.now
    state.events_recorded = 2  # shown in the status line (`systemctl status`)
    await notify_socket.wait_for(
        lambda m: m.get("STATUS") == "capturing from virtual mic; 2 events recorded",
        after=resumed_at,
    )
    await notify_socket.wait_for(_is_ping, after=resumed_at)

    stop.set()
    async with asyncio.timeout(TIMEOUT_S):
        await task
    await notify_socket.wait_for(lambda m: m.get("STOPPING") == "1")


async def test_ready_and_alive_while_waiting_for_a_sound_card(
    notify_socket: NotifySocket,
) -> None:
    state = AgentState()
    clock = FakeClock()
    watchdog = ServiceWatchdog(
        state,
        stall_s=5.0,
        notifier=SdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.address}),
        interval_s=0.02,
        clock=clock,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog.run(stop))
    state.capture_state = "waiting_for_device"
    state.capture_error = "no input device matches 'USB'"
    ready = await notify_socket.wait_for(lambda m: "READY" in m)
    assert "waiting for a sound card" in ready["STATUS"]
    assert "USB" in ready["STATUS"]
    # No audio at all for a long time, yet this is not a stall: pings go on.
    for _ in range(3):
        before = len(notify_socket.messages)
        clock.now += 100.0
        await notify_socket.wait_for(_is_ping, after=before)
    stop.set()
    async with asyncio.timeout(TIMEOUT_S):
        await task
    await notify_socket.wait_for(lambda m: m.get("STOPPING") == "1")


async def test_watchdog_outside_systemd_just_waits_for_stop() -> None:
    watchdog = ServiceWatchdog(AgentState(), stall_s=5.0, notifier=SdNotifier(None))
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog.run(stop))
    stop.set()
    async with asyncio.timeout(TIMEOUT_S):
        await task
    assert not watchdog.ready_sent


async def test_heartbeat_for_the_controller(notify_socket: NotifySocket) -> None:
    healthy = True
    heartbeat = ServiceHeartbeat(
        status=lambda: "watching 2 devices",
        alive=lambda: healthy,
        notifier=SdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.address}),
        interval_s=0.02,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeat.run(stop))
    ready = await notify_socket.wait_for(lambda m: "READY" in m)
    assert ready["STATUS"] == "watching 2 devices"
    await notify_socket.wait_for(_is_ping)
    stop.set()
    async with asyncio.timeout(TIMEOUT_S):
        await task
    await notify_socket.wait_for(lambda m: m.get("STOPPING") == "1")
    assert heartbeat.pings >= 1


async def test_watchdog_with_a_running_agent(notify_socket: NotifySocket, tmp_path: Path) -> None:
    """The real agent (file source, no MQTT/websocket) drives READY=1 and the pings."""

    sound = tmp_path / "quiet.wav"
    sf.write(sound, np.zeros(48000, dtype=np.float32), 48000, subtype="PCM_16")
    settings = AgentSettings(
        device_id="wd", data_dir=tmp_path / "data", mqtt={"enabled": False}, ws={"enabled": False}
    )
    agent = Agent(settings, FileSource(sound))
    watchdog = ServiceWatchdog(
        agent.state,
        stall_s=10.0,
        notifier=SdNotifier.from_environ({"NOTIFY_SOCKET": notify_socket.address}),
        interval_s=0.05,
    )
    async with asyncio.timeout(60):
        agent_task = asyncio.create_task(agent.run())
        watchdog_task = asyncio.create_task(watchdog.run(agent.stop_capture))
        ready = await notify_socket.wait_for(lambda m: "READY" in m)
        assert ready["STATUS"] == "capturing from file:quiet.wav"
        seen = len(notify_socket.messages)
        await notify_socket.wait_for(_is_ping, after=seen)
        await notify_socket.wait_for(_is_ping, after=len(notify_socket.messages))
        assert agent.state.last_block_monotonic > 0
        agent.request_stop()
        await agent_task
        await watchdog_task
    await notify_socket.wait_for(lambda m: m.get("STOPPING") == "1")
