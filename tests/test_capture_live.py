"""The real PortAudio capture path through the virtual microphone (PulseAudio null sink).

The agent selects the ALSA device `pulse` by name, as a user would select `Play! 3`.
"""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from edge.agent import Agent
from edge.settings import AgentSettings
from tests.fixtures.agent_process import AgentProcess, clean_env, python_probe
from tests.fixtures.virtual_mic import DEVICE_NAME, VirtualMic

pytestmark = pytest.mark.system


def _settings(data_dir: Path, **audio: object) -> AgentSettings:
    return AgentSettings(
        device_id="livepi",
        data_dir=data_dir,
        mqtt={"enabled": False},
        ws={"enabled": False},
        audio={"device": DEVICE_NAME, "stall_timeout_s": 2.0, "reopen_backoff_max_s": 1.0,
               **audio},
        recording={"pre_roll_s": 0.5, "post_roll_s": 0.5},
    )  # fmt: skip


async def _wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _wait_listening(agent: Agent) -> None:
    """Until a second of audio went through the pipeline (a stream takes a moment to flow)."""
    start = agent.state.frames_processed
    await _wait_for(lambda: agent.state.frames_processed - start >= 48000, 30, "audio to flow")


def _agent_env(data_dir: Path, **extra: str) -> dict[str, str]:
    values = {
        "SOUNDEDGE_DEVICE_ID": "livepi",
        "SOUNDEDGE_DATA_DIR": str(data_dir),
        "SOUNDEDGE_AUDIO__DEVICE": DEVICE_NAME,
        "SOUNDEDGE_MQTT__ENABLED": "false",
        "SOUNDEDGE_WS__ENABLED": "false",
        "SOUNDEDGE_RECORDING__PRE_ROLL_S": "0.5",
        "SOUNDEDGE_RECORDING__POST_ROLL_S": "0.5",
    }
    return clean_env(**{**values, **extra})


def _logged_events(data_dir: Path) -> list[dict[str, object]]:
    log = data_dir / "events.jsonl"
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [line["record"] for line in lines if line["kind"] == "event"]


def _wait_sync(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_soundedge_run_records_sounds_played_into_the_microphone(
    virtual_mic: VirtualMic, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    tone = virtual_mic.write_tone("tone.wav", seconds=0.6, amplitude=0.4)
    agent = AgentProcess.agent(_agent_env(data_dir))
    try:
        agent.wait_for_line("capturing from pulse")
        time.sleep(1.0)  # let the noise floor settle on the silence stream
        for _ in range(2):
            virtual_mic.play(tone)
            time.sleep(1.5)
        _wait_sync(lambda: len(_logged_events(data_dir)) >= 2, 30, "two events")
    finally:
        status = agent.stop()
    assert status == 0, agent.output
    events = _logged_events(data_dir)
    assert [e["seq"] for e in events] == [1, 2]
    for event in events:
        file = event["file"]
        assert isinstance(file, dict)
        path = data_dir / "events" / str(event["onset_time"])[:10] / file["name"]
        audio, rate = sf.read(str(path))
        assert rate == 48000
        assert 0.5 < event["duration_s"] < 1.0  # type: ignore[operator]
        assert audio.shape[0] / rate == pytest.approx(file["duration_s"], abs=1e-3)


async def test_missing_device_is_waited_for_then_used(
    virtual_mic: VirtualMic, tmp_path: Path
) -> None:
    virtual_mic.stop()  # the sound card is not there when the agent starts
    agent = Agent(_settings(tmp_path / "data"))
    task = asyncio.create_task(agent.run())
    try:
        await _wait_for(
            lambda: agent.state.capture_state == "waiting_for_device", 30, "waiting state"
        )
        assert agent.state.capture_error
        virtual_mic.start()  # plugged in
        await _wait_for(lambda: agent.state.capture_state == "running", 30, "capture to run")
        await _wait_listening(agent)
        await asyncio.to_thread(virtual_mic.play, virtual_mic.write_tone("t.wav", 0.5))
        await _wait_for(lambda: agent.state.events_recorded >= 1, 30, "an event")
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, timeout=30)


def test_device_vanishing_mid_run_is_recovered(virtual_mic: VirtualMic, tmp_path: Path) -> None:
    """The card is pulled and plugged back in; sounds after that are recorded again.

    The agent reopens the device in-process; if the driver wedges instead (ALSA's pulse plugin
    sometimes does), the agent exits with status 75 after finishing its files, and the service
    manager (here: the test, as systemd's Restart=always would) starts it again.
    """
    data_dir = tmp_path / "data"
    env = _agent_env(data_dir, SOUNDEDGE_AUDIO__STALL_TIMEOUT_S="2")
    agent = AgentProcess.agent(env)
    tone = virtual_mic.write_tone("t.wav", 0.5)
    try:
        agent.wait_for_line("capturing from pulse")
        virtual_mic.unplug()  # USB card pulled
        agent.wait_for_line("reopening it")
        virtual_mic.replug()  # plugged back in
        deadline = time.monotonic() + 60
        while True:
            if agent.process.poll() is not None:
                assert agent.process.returncode == 75, agent.output
                assert "restarts the agent" in agent.output
                agent = AgentProcess.agent(env)  # what systemd does
                agent.wait_for_line("capturing from pulse")
                break
            if any("capturing from pulse again" in line for line in agent.lines):
                break
            assert time.monotonic() < deadline, agent.output
            time.sleep(0.1)
        time.sleep(1.0)
        virtual_mic.play(tone)
        _wait_sync(lambda: len(_logged_events(data_dir)) >= 1, 30, "an event after replug")
    finally:
        status = agent.stop()
    assert status in (0, 75), agent.output


async def test_dead_microphone_is_flagged_and_clears(
    virtual_mic: VirtualMic, tmp_path: Path
) -> None:
    # The silence stream is digital zero: exactly what a dead input looks like.
    agent = Agent(_settings(tmp_path / "data", dead_input_s=1.0))
    task = asyncio.create_task(agent.run())
    try:
        await _wait_for(lambda: agent.state.dead_input == "silent", 30, "the silent flag")
        player = virtual_mic.play(virtual_mic.write_tone("t.wav", 3.0, amplitude=0.2), wait=False)
        await _wait_for(lambda: agent.state.dead_input is None, 30, "the flag to clear")
        await asyncio.to_thread(player.wait, 30)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, timeout=30)


def test_kill_9_during_a_write_leaves_no_partial_file_under_a_final_name(
    virtual_mic: VirtualMic, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = _agent_env(data_dir)
    agent = AgentProcess.agent(env)
    long_tone = virtual_mic.write_tone("long.wav", seconds=4.0, amplitude=0.3)
    try:
        agent.wait_for_line("capturing from pulse")
        time.sleep(1.0)
        player = virtual_mic.play(long_tone, wait=False)
        agent.wait_for_line("started")
        time.sleep(0.5)  # some audio is in the .part file now
    finally:
        agent.kill()  # SIGKILL in the middle of the event
    player.wait(timeout=30)
    assert list((data_dir / "events").glob("*/.*.part"))
    finals = [p for p in (data_dir / "events").glob("*/*") if not p.name.startswith(".")]
    assert finals == []
    # On restart the partial recording is salvaged into a complete, verified event.
    restarted = AgentProcess.agent(env)
    try:
        restarted.wait_for_line("salvaged")
    finally:
        assert restarted.stop() == 0, restarted.output
    events = _logged_events(data_dir)
    assert [e["seq"] for e in events] == [1]
    assert events[0]["clock_uncertain"] is True
    file = events[0]["file"]
    assert isinstance(file, dict)
    path = data_dir / "events" / str(events[0]["onset_time"])[:10] / file["name"]
    assert sf.info(str(path)).frames > 0
    assert not list((data_dir / "events").glob("*/.*.part"))


def test_record_fixed_span_and_ring_mode(virtual_mic: VirtualMic, tmp_path: Path) -> None:
    env = _agent_env(tmp_path / "data")
    fixed = tmp_path / "fixed.wav"
    result = subprocess.run(
        [sys.executable, "-m", "edge", "record", "--seconds", "1", "--out", str(fixed)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sf.info(str(fixed)).frames == 48000
    ring_file = tmp_path / "ring.flac"
    result = subprocess.run(
        [sys.executable, "-m", "edge", "record", "--buffers", "3", "--buffer-seconds", "0.5",
         "--out", str(ring_file), "--stop-after", "3"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sf.info(str(ring_file)).frames == 3 * 24000  # the ring's capacity, not 3 s


def test_level_meter_prints_levels(virtual_mic: VirtualMic, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge", "level", "--seconds", "2"],
        env=_agent_env(tmp_path / "data"), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "dBFS" in result.stdout
    assert "floor" in result.stdout


@pytest.mark.parametrize("command", [["record", "--seconds", "1", "--out", "x.wav"], ["level"]])
def test_missing_device_fails_record_and_level_with_exit_2(
    virtual_mic: VirtualMic, tmp_path: Path, command: list[str]
) -> None:
    env = _agent_env(tmp_path / "data", SOUNDEDGE_AUDIO__DEVICE="No Such Card")
    result = subprocess.run(
        [sys.executable, "-m", "edge", *command], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "SOUNDEDGE_AUDIO__DEVICE" in result.stderr
    assert "No Such Card" in result.stderr
    assert "Traceback" not in result.stderr


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    env = _agent_env(blocker / "data")
    result = subprocess.run(
        [sys.executable, "-m", "edge", "run"], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "data directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ALSA only")
def test_device_scan_leaves_no_alsa_plugin_loaded() -> None:
    # PortAudio's device scan loads every ALSA plugin of the configuration (a52 brings
    # libavcodec and its chain, jack, pulse...); alsa-lib would keep them all, 10+ MiB
    # resident for the agent's life, until its global configuration is freed.
    probe = (
        "from edge.capture import list_input_devices; list_input_devices(); "
        "print(sum('libasound_module_pcm_' in line for line in open('/proc/self/maps')))"
    )
    assert python_probe(probe).strip() == "0"
