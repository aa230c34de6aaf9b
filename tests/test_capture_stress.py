"""Stress: an unpaced capture device through the real PortAudio path (ALSA's `file` plugin).

The agent runs as a subprocess whose HOME holds an `.asoundrc` defining the capture PCM `stress`:
ALSA's `file` plugin over the `null` PCM, reading its samples from `infile`. Nothing paces it;
it delivers as fast as PortAudio calls it (thousands of times real time), so `audio.paced=false`
tells the capture supervisor that this is not a runaway driver.

An unpaced source can only be bounded by what it has to give: the agent has no back-pressure
(the callback never waits), so a source that never stops outruns any pipeline and laps any ring.
The `infile` is therefore a FIFO holding the whole scene (16 s: what a 1 MiB pipe holds at
16 kHz float32, less than the 30 s ring); it arrives in a few milliseconds, then the test
trickles in one zero frame per block period, so the stream stays alive at about real time and
PortAudio's thread never waits long in `read()` at shutdown. (A read that finds the pipe short
leaves the rest of the block as the null PCM's buffer had it: stale samples, here from the
scene's last second, which is silent for that reason.)

What this checks: a whole scene arriving as one burst through PortAudio is processed while the
event files are being written, with no frame lost or reordered: every burst becomes one event
whose file is exactly input[onset - pre_roll : offset + post_roll], to the sample, the onsets
and offsets being those of the detector run offline over the same input. `frames_lost` and
input overflows are read from the agent's shutdown log line.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.detector import Detector
from edge.settings import DetectorSettings
from tests.fixtures.agent_process import AgentProcess, clean_env

pytestmark = pytest.mark.system

RATE = 16000
BLOCKSIZE = 1024
PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
SCENE_FRAMES = PIPE_BYTES // 4  # float32 mono: 262144 frames, 16.4 s
BURSTS_S = [1.5 + 2.0 * k for k in range(7)]  # 0.3 s tones, a new event file every 2 s
BURST_LENGTH_S = 0.3
ROLL_S = 0.5  # pre-roll and post-roll


def _scene() -> np.ndarray:
    """-60 dBFS noise with tone bursts of distinct frequencies; float32 values exact in a file."""
    rng = np.random.default_rng(11)
    signal = (rng.standard_normal(SCENE_FRAMES) * 10 ** (-60 / 20)).astype(np.float32)
    t = np.arange(int(BURST_LENGTH_S * RATE)) / RATE
    for k, start_s in enumerate(BURSTS_S):
        start = int(start_s * RATE)
        tone = 0.3 * np.sin(2 * np.pi * (500 + 250 * k) * t)
        signal[start : start + t.size] += tone.astype(np.float32)
    # The last second silent: after the scene, the null PCM's buffer (stale) is what follows.
    signal[-int(1.0 * RATE) :] = 0.0
    return signal


def _offline_events(signal: np.ndarray) -> list[tuple[int, int]]:
    detector = Detector(DetectorSettings(), RATE, 1)
    events = detector.process(signal[:, None]) + detector.flush()
    starts = [e.sample for e in events if e.kind == "start"]
    ends = [e.sample for e in events if e.kind == "end"]
    return list(zip(starts, ends, strict=True))


class _Fifo:
    """The `infile`: a FIFO preloaded with the scene, then one zero frame per block period."""

    def __init__(self, path: Path, data: bytes) -> None:
        os.mkfifo(path)
        # O_RDWR: opening never blocks, and the pipe (with its contents) lives while the test
        # holds it, however often PortAudio opens and closes the PCM while probing devices.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        size = fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        if size < len(data):
            pytest.fail(f"a pipe holds only {size} bytes here; the scene needs {len(data)}")
        written = os.write(self._fd, data)
        assert written == len(data)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, name="fifo-trickle", daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        zero_frame = np.zeros(1, dtype=np.float32).tobytes()
        while not self._stop.wait(BLOCKSIZE / RATE):
            try:
                os.write(self._fd, zero_frame)
            except BlockingIOError:  # the scene is still in the pipe
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self._fd)


@pytest.fixture
def stress_device(tmp_path: Path) -> Iterator[tuple[Path, np.ndarray]]:
    """A HOME whose `.asoundrc` defines the capture PCM `stress`; yields (HOME, the scene)."""
    signal = _scene()
    home = tmp_path / "home"
    home.mkdir()
    fifo = _Fifo(tmp_path / "scene.fifo", signal.astype("<f4").tobytes())
    (home / ".asoundrc").write_text(
        "pcm.stress {\n"
        "    type file\n"
        "    slave.pcm null\n"
        '    file "/dev/null"\n'
        f'    infile "{tmp_path / "scene.fifo"}"\n'
        "}\n"
    )
    try:
        yield home, signal
    finally:
        fifo.close()


def _logged_events(data_dir: Path) -> list[dict[str, object]]:
    log = data_dir / "events.jsonl"
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [line["record"] for line in lines if line["kind"] == "event"]


def test_unpaced_file_plugin_scene_is_recorded_without_losing_a_frame(
    stress_device: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    home, signal = stress_device
    expected = _offline_events(signal)
    assert len(expected) == len(BURSTS_S)  # the scene itself: one detection per burst
    data_dir = tmp_path / "data"
    env = clean_env(
        HOME=str(home),
        SOUNDEDGE_DEVICE_ID="stresspi",
        SOUNDEDGE_DATA_DIR=str(data_dir),
        SOUNDEDGE_AUDIO__DEVICE="stress",
        SOUNDEDGE_AUDIO__SAMPLERATE=str(RATE),
        SOUNDEDGE_AUDIO__BLOCKSIZE=str(BLOCKSIZE),
        SOUNDEDGE_AUDIO__PACED="false",
        # The plugin delivers the whole scene in a burst: the ring must hold all of it (what
        # is tested is that nothing is lost between the ring, the detector and the files).
        SOUNDEDGE_AUDIO__RING_BUFFERS="30",
        SOUNDEDGE_MQTT__ENABLED="false",
        SOUNDEDGE_WS__ENABLED="false",
        SOUNDEDGE_RECORDING__PRE_ROLL_S=str(ROLL_S),
        SOUNDEDGE_RECORDING__POST_ROLL_S=str(ROLL_S),
        SOUNDEDGE_RECORDING__SUBTYPE="FLOAT",
    )
    env.pop("ALSA_CONFIG_PATH", None)
    agent = AgentProcess.agent(env)
    try:
        agent.wait_for_line("capturing from stress")
        deadline = time.monotonic() + 30
        while len(_logged_events(data_dir)) < len(expected):
            assert time.monotonic() < deadline, agent.output
            time.sleep(0.1)
        # Past the capture supervisor's first rate window (1 s), which saw the whole scene
        # arrive at once: a device with audio.paced=true would be reopened as a runaway here.
        time.sleep(2.0)
    finally:
        status = agent.stop()
    assert status == 0, agent.output
    assert "faster than real time" not in agent.output
    counters = re.search(r"input overflows: (\d+); frames lost: (\d+)", agent.output)
    assert counters is not None, agent.output
    assert (int(counters.group(1)), int(counters.group(2))) == (0, 0), agent.output

    events = _logged_events(data_dir)
    assert [e["seq"] for e in events] == list(range(1, len(expected) + 1))
    roll = int(ROLL_S * RATE)
    for event, (onset, offset) in zip(events, expected, strict=True):
        file = event["file"]
        assert isinstance(file, dict)
        path = data_dir / "events" / str(event["onset_time"])[:10] / str(file["name"])
        audio, rate = sf.read(str(path), dtype="float32")
        assert rate == RATE
        # Frame 0 of the stream is frame 0 of the scene, so the file is exactly this slice.
        np.testing.assert_array_equal(audio, signal[onset - roll : offset + roll])
