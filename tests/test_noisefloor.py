"""The noise floor tracker against a plain reference implementation of its update rule."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edge.noisefloor import MIN_SPREAD_DB, SPREAD_SMOOTHING, NoiseFloor, _median
from tests.fixtures.agent_process import python_probe

FloatArray = npt.NDArray[np.float64]


def reference_feed(
    levels_db: FloatArray, frame_s: float, threshold_db: float, floor_window_s: float
) -> tuple[FloatArray, FloatArray]:
    """The update rule written plainly, one update after the other (numpy, no buffers)."""
    tracker = NoiseFloor(levels_db.shape[1], frame_s, threshold_db, floor_window_s)
    per_update = tracker.frames_per_update
    thresholds = np.empty_like(levels_db)
    floors = np.empty_like(levels_db)
    floor: FloatArray | None = None
    spread = np.full(levels_db.shape[1], MIN_SPREAD_DB)
    limit, current = np.full(levels_db.shape[1], np.inf), np.full(levels_db.shape[1], np.nan)
    for start in range(0, levels_db.shape[0], per_update):
        rows = levels_db[start : start + per_update]
        thresholds[start : start + per_update] = limit
        floors[start : start + per_update] = current
        if rows.shape[0] < per_update:
            break
        if floor is None:
            floor = np.median(rows, axis=0)
            spread = np.maximum(np.mean(np.abs(rows - floor), axis=0), MIN_SPREAD_DB)
        else:
            allowance = 3.0 * spread
            dev = rows - floor
            eventish = dev > allowance + threshold_db
            vote = np.where(eventish, tracker._event_weight, np.sign(dev))
            floor = floor + tracker._step_db * vote.sum(axis=0)
            mean = rows.sum(axis=0) * (1.0 / rows.shape[0])
            floor = np.where(mean < floor - allowance, mean, floor)
            quiet = ~eventish
            n_quiet = quiet.sum(axis=0)
            abs_dev = np.abs(dev, where=quiet, out=np.zeros_like(dev)).sum(axis=0)
            mad = np.divide(abs_dev, n_quiet, out=spread.copy(), where=n_quiet > 0)
            spread = np.maximum(spread + SPREAD_SMOOTHING * (mad - spread), MIN_SPREAD_DB)
        limit = floor + 3.0 * spread
        current = floor
    return thresholds, floors


def levels(seconds: float, seed: int = 0) -> FloatArray:
    """Nine channels of frame levels: a drifting background, events, a drop, a silent channel."""
    rng = np.random.default_rng(seed)
    n = round(seconds / 0.01)
    base = -60.0 + 4.0 * np.sin(np.arange(n) / 700.0)[:, None] + rng.normal(0, 2.0, (n, 9))
    for start in rng.integers(0, n - 300, 12):
        base[start : start + rng.integers(5, 300), rng.integers(0, 9)] += rng.uniform(6, 30)
    base[n // 2 :, 3] -= 25.0  # a background switched off
    base[:, 8] = -400.0  # digital silence
    return base


@pytest.mark.parametrize("cuts", [[], [1] * 120, [49, 1, 50, 0, 51, 333], [5000, 7, 0, 99]])
def test_feed_matches_the_plain_rule_whatever_the_cuts(cuts: list[int]) -> None:
    frames = levels(90.0)
    expected = reference_feed(frames, 0.01, 5.0, 10.0)
    tracker = NoiseFloor(9, 0.01, 5.0, 10.0)
    got_thresholds, got_floors, start = [], [], 0
    for size in [*cuts, frames.shape[0]]:
        thresholds, floors = tracker.feed(frames[start : start + size])
        got_thresholds.append(thresholds)
        got_floors.append(floors)
        start = min(frames.shape[0], start + size)
    # Bit for bit: the thresholds of a frame never depend on how the frames were cut.
    assert np.array_equal(np.concatenate(got_thresholds), expected[0])
    assert np.array_equal(np.concatenate(got_floors), expected[1], equal_nan=True)


def test_empty_feed_returns_empty_arrays() -> None:
    tracker = NoiseFloor(9, 0.01, 5.0, 10.0)
    thresholds, floors = tracker.feed(np.empty((0, 9)))
    assert thresholds.shape == floors.shape == (0, 9)


def test_shorter_update_after_a_frame_length_change_takes_the_pending_frames() -> None:
    frames = levels(10.0)
    tracker = NoiseFloor(9, 0.01, 5.0, 10.0)
    tracker.feed(frames[:140])  # two updates, 40 frames pending
    tracker.configure(0.02, 5.0, 10.0)  # 25 frames per update from now on
    thresholds, floors = tracker.feed(frames[140:240])
    assert thresholds.shape == floors.shape == (100, 9)
    # The 40 pending frames made an update at once; all 100 new frames are past it.
    assert np.isfinite(thresholds[:, :8]).all()
    assert tracker._pending_frames == 0


def test_median_is_numpys_median() -> None:
    rng = np.random.default_rng(3)
    for n in range(1, 40):
        for channels in (1, 2, 3):
            rows = rng.normal(-60.0, 20.0, (n, channels))
            if n > 2:
                rows[0, 0] = -np.inf
            if n > 5:
                rows[1, -1] = np.nan
            np.testing.assert_array_equal(_median(rows), np.median(rows, axis=0))


def test_the_tracker_does_not_import_numpy_ma() -> None:
    # np.median imports numpy.ma (1.2 MiB resident in the agent for its whole life).
    probe = (
        "import sys, numpy as np; from edge.noisefloor import NoiseFloor; "
        "t = NoiseFloor(2, 0.01, 6.0, 2.0); t.feed(np.full((1000, 2), -60.0)); "
        "print('numpy.ma' in sys.modules)"
    )
    assert python_probe(probe).strip() == "False"
