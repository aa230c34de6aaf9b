"""`soundedge run` and `soundedge-controller run` under a stand-in for systemd.

The test binds the notification socket, starts the real program with `NOTIFY_SOCKET` and
`WATCHDOG_USEC` as systemd would (Type=notify, WatchdogSec=2), and checks READY=1, the watchdog
pings, and STOPPING=1 plus a clean exit on SIGTERM (`systemctl stop`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.virtual_mic import DEVICE_NAME, VirtualMic

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60.0
WATCHDOG_USEC = "2000000"  # WatchdogSec=2: a ping every second

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(sys.platform == "win32", reason="sd_notify is POSIX only"),
]


def _wired(path: str, name: str) -> bool:
    return name in (REPO / path).read_text(encoding="utf-8")


class FakeSystemd:
    """The notification socket of a Type=notify service, and the messages it received."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
        self.path = self.directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], proc: subprocess.Popen[str]
    ) -> dict[str, str]:
        deadline = time.monotonic() + TIMEOUT_S
        seen = 0
        while time.monotonic() < deadline:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if proc.poll() is not None:
                    raise AssertionError(f"the program exited ({proc.returncode})") from None
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        raise AssertionError(f"no matching notification in {TIMEOUT_S:.0f} s: {self.messages}")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.directory.rmdir()


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    yield fake
    fake.close()


def _start(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=10)
    return proc.returncode, output


def _agent_env(systemd: FakeSystemd, data_dir: Path, device: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    env.update(
        NOTIFY_SOCKET=str(systemd.path),
        WATCHDOG_USEC=WATCHDOG_USEC,
        SOUNDEDGE_DEVICE_ID="svc",
        SOUNDEDGE_DATA_DIR=str(data_dir),
        SOUNDEDGE_AUDIO__DEVICE=device,
        SOUNDEDGE_AUDIO__REOPEN_BACKOFF_MAX_S="1",
        SOUNDEDGE_MQTT__ENABLED="false",
        SOUNDEDGE_WS__ENABLED="false",
    )
    return env


def _is_ping(message: dict[str, str]) -> bool:
    return message.get("WATCHDOG") == "1"


@pytest.mark.skipif(
    not _wired("edge/agent.py", "ServiceWatchdog"), reason="ServiceWatchdog not yet in the agent"
)
@pytest.mark.timeout(180)
def test_agent_reports_ready_alive_and_stopping(
    systemd: FakeSystemd, virtual_mic: VirtualMic, tmp_path: Path
) -> None:
    env = _agent_env(systemd, tmp_path / "data", DEVICE_NAME)
    proc = _start([sys.executable, "-m", "edge", "run"], env, tmp_path)
    try:
        ready = systemd.wait_for(lambda m: "READY" in m, proc)
        assert ready["STATUS"].startswith("capturing from"), ready
        count = len(systemd.messages)
        systemd.wait_for(lambda m: _is_ping(m) and len(systemd.messages) > count, proc)
        count = len(systemd.messages)
        systemd.wait_for(lambda m: _is_ping(m) and len(systemd.messages) > count, proc)
    finally:
        code, output = _stop(proc)
    assert code == 0, output
    systemd.wait_for(lambda m: m.get("STOPPING") == "1", proc)


@pytest.mark.skipif(
    not _wired("edge/agent.py", "ServiceWatchdog"), reason="ServiceWatchdog not yet in the agent"
)
@pytest.mark.timeout(180)
def test_agent_without_a_sound_card_is_ready_and_says_so(
    systemd: FakeSystemd, virtual_mic: VirtualMic, tmp_path: Path
) -> None:
    env = _agent_env(systemd, tmp_path / "data", "no such card")
    proc = _start([sys.executable, "-m", "edge", "run"], env, tmp_path)
    try:
        ready = systemd.wait_for(lambda m: "READY" in m, proc)
        assert ready["STATUS"].startswith("waiting for a sound card"), ready
        assert "no such card" in ready["STATUS"]
        count = len(systemd.messages)
        systemd.wait_for(lambda m: _is_ping(m) and len(systemd.messages) > count, proc)
    finally:
        code, output = _stop(proc)
    assert code == 0, output


@pytest.mark.skipif(
    not _wired("controller/service.py", "ServiceHeartbeat"),
    reason="ServiceHeartbeat not yet in the controller",
)
@pytest.mark.timeout(180)
def test_controller_reports_ready_alive_and_stopping(systemd: FakeSystemd, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    env.update(
        NOTIFY_SOCKET=str(systemd.path),
        WATCHDOG_USEC=WATCHDOG_USEC,
        SOUNDEDGE_CONTROLLER_ARCHIVE_DIR=str(tmp_path / "archive"),
        SOUNDEDGE_CONTROLLER_MQTT__HOST="127.0.0.1",
        SOUNDEDGE_CONTROLLER_MQTT__PORT="9",  # nothing listens: it keeps retrying, still alive
    )
    proc = _start([sys.executable, "-m", "controller", "run"], env, tmp_path)
    try:
        systemd.wait_for(lambda m: "READY" in m, proc)
        count = len(systemd.messages)
        systemd.wait_for(lambda m: _is_ping(m) and len(systemd.messages) > count, proc)
    finally:
        code, output = _stop(proc)
    assert code == 0, output
    systemd.wait_for(lambda m: m.get("STOPPING") == "1", proc)
