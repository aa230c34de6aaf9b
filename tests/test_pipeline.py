"""The whole agent pipeline on a file source: detection, pre/post-roll, sample-exact files.

The capture path here is `FileSource` (no sound card); the PortAudio path is tested with the
virtual microphone in test_capture_live.py.
"""

import asyncio
import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.agent import Agent
from edge.bus import AgentEvent, EventStarted
from edge.capture import FileSource
from edge.detector import Detector
from edge.fileio import sha256_of
from edge.pipeline import Pipeline
from edge.settings import AgentSettings

RATE = 48000


def _scene(path: Path, bursts: list[tuple[float, float]], seconds: float = 6.0) -> np.ndarray:
    rng = np.random.default_rng(7)
    signal = (rng.standard_normal(int(seconds * RATE)) * 10 ** (-60 / 20)).astype(np.float32)
    for start_s, length_s in bursts:
        start = int(start_s * RATE)
        t = np.arange(int(length_s * RATE)) / RATE
        signal[start : start + t.size] += (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    sf.write(path, signal, RATE, subtype="FLOAT")
    return signal


def _settings(tmp_path: Path, **recording: float) -> AgentSettings:
    return AgentSettings(
        device_id="filepi",
        data_dir=tmp_path / "data",
        mqtt={"enabled": False},
        ws={"enabled": False},
        recording={"pre_roll_s": 0.5, "post_roll_s": 0.5, "subtype": "FLOAT", **recording},
        audio={"ring_buffers": 20, "buffer_s": 1.0},
    )


async def _run_until(agent: Agent, events: int, timeout_s: float = 60.0) -> None:
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(timeout_s):
            while agent.state.events_recorded < events:
                await asyncio.sleep(0.05)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, timeout=30)


def _offline_events(signal: np.ndarray, settings: AgentSettings) -> list[tuple[int, int]]:
    """(onset, offset) samples from the detector fed the whole signal at once."""
    detector = Detector(settings.detector, RATE, 1)
    events = detector.process(signal[:, None]) + detector.flush()
    starts = [e.sample for e in events if e.kind == "start"]
    ends = [e.sample for e in events if e.kind == "end"]
    return list(zip(starts, ends, strict=True))


@pytest.mark.parametrize("process_interval_s", [0.0, 0.1])
async def test_bursts_become_event_files_with_exact_pre_and_post_roll(
    tmp_path: Path, process_interval_s: float
) -> None:
    source_path = tmp_path / "scene.wav"
    signal = _scene(source_path, [(1.5, 0.4), (3.5, 0.6)])
    settings = _settings(tmp_path)
    # Batching blocks (a CPU saving on a Pi) must not change a single sample of the result.
    settings = settings.model_copy(
        update={
            "audio": settings.audio.model_copy(update={"process_interval_s": process_interval_s})
        }
    )
    expected = _offline_events(signal, settings)
    assert len(expected) == 2
    agent = Agent(settings, FileSource(source_path, realtime=False))
    await _run_until(agent, events=2)

    records = agent.store.records_since(0, 10)
    assert [r.seq for r in records] == [1, 2]
    for record, (onset, offset) in zip(records, expected, strict=True):
        assert record.file is not None
        path = agent.store.path_of(record)
        assert sha256_of(path) == record.file.sha256
        audio, rate = sf.read(str(path), dtype="float32")
        assert rate == RATE
        # Live (1024-frame blocks through the ring) equals offline, to the sample.
        assert record.duration_s == pytest.approx((offset - onset) / RATE, abs=1e-6)
        assert record.pre_roll_s == pytest.approx(0.5, abs=1e-6)
        assert record.post_roll_s == pytest.approx(0.5, abs=1e-6)
        # The file is exactly input[onset - pre_roll : offset + post_roll]: nothing dropped.
        first = onset - RATE // 2
        np.testing.assert_array_equal(audio, signal[first : offset + RATE // 2])


async def test_disabled_detection_records_nothing(tmp_path: Path) -> None:
    source_path = tmp_path / "scene.wav"
    _scene(source_path, [(1.0, 0.5)], seconds=3.0)
    settings = _settings(tmp_path).model_copy(update={"enabled": False})
    agent = Agent(settings, FileSource(source_path, realtime=False))
    task = asyncio.create_task(agent.run())
    async with asyncio.timeout(30):
        while agent.state.frames_processed < 3 * RATE:
            await asyncio.sleep(0.05)
    agent.request_stop()
    await asyncio.wait_for(task, timeout=30)
    assert agent.store.records_since(0, 10) == []


async def test_event_open_at_shutdown_is_finished_not_lost(tmp_path: Path) -> None:
    source_path = tmp_path / "scene.wav"
    _scene(source_path, [(1.0, 4.0)], seconds=6.0)
    agent = Agent(_settings(tmp_path), FileSource(source_path, realtime=True))
    task = asyncio.create_task(agent.run())
    async with asyncio.timeout(30):
        while not agent.state.event_active:
            await asyncio.sleep(0.05)
    agent.request_stop()  # SIGTERM in the middle of an event
    await asyncio.wait_for(task, timeout=30)
    records = agent.store.records_since(0, 10)
    assert len(records) == 1
    assert records[0].file is not None
    assert agent.store.path_of(records[0]).exists()
    assert not list((tmp_path / "data" / "events").glob("*/.*.part"))


def _trace_runs(monkeypatch: pytest.MonkeyPatch, agent: Agent) -> list[int | str]:
    """Frames in the ring at each pipeline run, with "start" where an `EventStarted` went out."""
    history: list[int | str] = []
    drain = Pipeline._drain

    async def recording_drain(self: Pipeline) -> None:
        history.append(self._ring.frames_written)
        await drain(self)

    monkeypatch.setattr(Pipeline, "_drain", recording_drain)
    publish = agent.bus.publish

    def recording_publish(event: AgentEvent) -> None:
        if isinstance(event, EventStarted):
            history.append("start")
        publish(event)

    monkeypatch.setattr(agent.bus, "publish", recording_publish)
    return history


async def test_batching_pipeline_is_woken_at_once_by_an_onset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a long batching interval the onset, not a full batch, brings the `start`."""
    source_path = tmp_path / "scene.wav"
    _scene(source_path, [(2.5, 0.5)], seconds=4.0)  # the tone starts mid-batch
    settings = _settings(tmp_path)
    settings = settings.model_copy(
        update={"audio": settings.audio.model_copy(update={"process_interval_s": 1.0})}
    )
    batch_frames = RATE
    agent = Agent(settings, FileSource(source_path, realtime=True))
    history = _trace_runs(monkeypatch, agent)
    await _run_until(agent, events=1)
    runs = [frames for frames in history[: history.index("start")] if isinstance(frames, int)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(runs)]
    # Quiet noise before the tone: one run per full batch (a second of audio)...
    assert len(gaps) >= 2
    assert all(gap >= batch_frames for gap in gaps[:-1])
    # ...until the tone's first block woke the pipeline mid-batch, and the start came from
    # that run (or the block-by-block runs after it), not from the next full batch.
    assert gaps[-1] < batch_frames


async def test_batching_resumes_once_the_start_is_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the onset's eager runs produced the `start`, the pipeline goes back to batches at
    once instead of running for every block of the rest of the eager window."""
    source_path = tmp_path / "scene.wav"
    _scene(source_path, [(2.5, 0.5)], seconds=4.5)
    settings = _settings(tmp_path)
    settings = settings.model_copy(
        update={
            "audio": settings.audio.model_copy(update={"process_interval_s": 1.0}),
            # A long eager window, so the test tells "ended by the start" from "ran out".
            "detector": settings.detector.model_copy(update={"min_event_s": 0.3}),
        }
    )
    agent = Agent(settings, FileSource(source_path, realtime=True))
    history = _trace_runs(monkeypatch, agent)
    await _run_until(agent, events=1)
    at_start = history.index("start")
    start_run = history[at_start - 1]
    later_runs = [frames for frames in history[at_start + 1 :] if isinstance(frames, int)]
    assert isinstance(start_run, int)
    assert later_runs, "the event ended after further pipeline runs"
    # The eager window (min_event_s + 0.1 s after the onset) is still open when the start goes
    # out 0.3 s in; the next run is nevertheless a whole batch later.
    assert later_runs[0] - start_run >= RATE
