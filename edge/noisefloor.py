"""Noise floor and background fluctuation, tracked per level channel (broadband and each band).

The floor is a running median of the frame levels in dB, moved by a sign rule: every frame above
the floor pushes it up by a small step, every frame below pulls it down by the same step. A
sign rule does not care how loud an event is, only how long it lasts, and frames that are
clearly part of an event (above floor + allowance + threshold) push with a much smaller weight,
so events do not lift the floor under themselves, while a background that rises and stays is
still absorbed within about `floor_window_s`. A background that falls far below the floor
(a machine switched off) is followed at once.

The fluctuation `spread` is the mean absolute deviation of the background's frame levels around
the floor. A channel with few samples per frame (a low octave band) or a fluctuating background
(pink or brown noise, wind) has a large spread; the trigger allowance is a multiple of it, so
`threshold_db` means the same thing in every channel: dB above what the background itself
reaches.

The update runs once every `frames_per_update` frames (half a second) on the frames since the
last update, vectorised over frames and channels; the thresholds in effect for a frame are those
of the last update before it. Update boundaries are counted in frames from the start, so the
result never depends on how the input was cut into blocks.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# How fast the floor follows the background, in dB per second, when every frame is above (or
# below) it. Backgrounds drift by ~1 dB/s at most (traffic, wind, day/night); three times that
# keeps the floor close behind.
QUIET_RATE_DB_PER_S = 3.0
# Trigger allowance = this many mean absolute deviations above the floor (~2.3 sigma for
# Gaussian-distributed dB levels): the background alone rarely gets there.
ALLOWANCE_SPREADS = 3.0
# Smallest spread assumed, in dB, so a perfectly steady synthetic background does not make the
# detector trigger on rounding noise.
MIN_SPREAD_DB = 0.05
# Weight of one update's mean absolute deviation in the running spread.
SPREAD_SMOOTHING = 0.1
# Seconds between updates. Each costs ~25 small numpy calls; on the benchmark scenes 0.25 s gave
# F1 +0.005 for twice the cost, 1 s lost 0.01.
UPDATE_S = 0.5


class NoiseFloor:
    """Floor (dB) and trigger threshold (dB) per channel, from frame levels in dB."""

    def __init__(
        self,
        n_channels: int,
        frame_s: float,
        threshold_db: float,
        floor_window_s: float,
    ) -> None:
        self.n_channels = n_channels
        self.floor_db: FloatArray | None = None
        self.spread_db = np.full(n_channels, MIN_SPREAD_DB)
        self._pending: list[FloatArray] = []
        self._pending_frames = 0
        # Work buffers of the update (reused: it runs twice a second).
        self._dev = np.empty((0, n_channels))
        self._eventish = np.empty((0, n_channels), dtype=np.bool_)
        self._sums_in = np.empty((0, 3 * n_channels))
        self.configure(frame_s, threshold_db, floor_window_s)

    def configure(self, frame_s: float, threshold_db: float, floor_window_s: float) -> None:
        """Apply new settings; the floor and spread are kept."""
        self.frames_per_update = max(1, round(UPDATE_S / frame_s))
        self._step_db = QUIET_RATE_DB_PER_S * frame_s
        # Event frames push so that a lasting rise of threshold + a few dB is absorbed within
        # floor_window_s.
        event_rate = (threshold_db + 3.0) / floor_window_s
        self._event_weight = min(1.0, event_rate / QUIET_RATE_DB_PER_S)
        self._threshold_db = threshold_db
        self._refresh()

    def shift(self, delta_db: FloatArray) -> None:
        """Move the floors by delta_db per channel (the levels' scale changed, e.g. a filter)."""
        if self.floor_db is not None:
            self.floor_db = self.floor_db + delta_db
            self._refresh()

    def thresholds(self) -> FloatArray:
        """Level per channel above which the background alone rarely goes (inf before warm-up)."""
        return self._thresholds

    def floors(self) -> FloatArray:
        """Floor per channel in dB (nan before warm-up)."""
        return self._floors

    def feed(self, levels_db: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Take (frames, channels) levels; return the thresholds and floors in effect per frame."""
        n_frames = levels_db.shape[0]
        if n_frames == 0:
            return np.empty_like(levels_db), np.empty_like(levels_db)
        per_update = self.frames_per_update
        # What each run of frames compares against: the thresholds and floors of the update
        # before it, and how many frames it has.
        thresholds = [self._thresholds]
        floors = [self._floors]
        counts = []
        start = 0
        if self._pending_frames:
            # Complete the update begun in an earlier block (if the frame length has changed
            # since, it may already have the frames of an update or more).
            take = max(0, min(n_frames, per_update - self._pending_frames))
            if take:
                self._pending.append(levels_db[:take])
                self._pending_frames += take
                counts.append(take)
                start = take
            if self._pending_frames >= per_update:
                rows = np.concatenate(self._pending)
                self._pending = []
                self._pending_frames = 0
                self._update(rows, rows.sum(axis=0) * (1.0 / rows.shape[0]))
                if take:
                    thresholds.append(self._thresholds)
                    floors.append(self._floors)
                else:  # no frame of this block had the thresholds before the update
                    thresholds[0] = self._thresholds
                    floors[0] = self._floors
        # Whole updates within this block: their means do not depend on the floor, so they
        # are taken at once (the sums run over the same frames in the same order).
        n_whole = (n_frames - start) // per_update
        if n_whole:
            stop = start + n_whole * per_update
            whole = levels_db[start:stop].reshape(n_whole, per_update, -1)
            means = whole.sum(axis=1) * (1.0 / per_update)
            for k in range(n_whole):
                self._update(whole[k], means[k])
                thresholds.append(self._thresholds)
                floors.append(self._floors)
            counts += [per_update] * n_whole
            start = stop
        if start < n_frames:
            self._pending.append(levels_db[start:])
            self._pending_frames += n_frames - start
            counts.append(n_frames - start)
        # The last update made (if any) is in effect only from the next block on.
        n_runs = len(counts)
        return (
            np.repeat(np.array(thresholds[:n_runs]), counts, axis=0),
            np.repeat(np.array(floors[:n_runs]), counts, axis=0),
        )

    def _update(self, rows: FloatArray, mean: FloatArray) -> None:
        """One update from `rows` (frames, channels) and their mean per channel."""
        if self.floor_db is None:
            floor = _median(rows)
            spread = np.maximum(np.mean(np.abs(rows - floor), axis=0), MIN_SPREAD_DB)
            self.floor_db = floor
            self.spread_db = spread
            self._refresh()
            return
        # Few numpy calls, into buffers kept between updates: this runs twice a second on
        # every channel, and 7200 times for an hour of a file. The three sums per channel
        # (votes, absolute deviations of the background, event frames) are one reduction over
        # side-by-side columns; each column is still summed frame after frame.
        n, c = rows.shape
        if self._sums_in.shape != (n, 3 * c):
            self._dev = np.empty_like(rows)
            self._eventish = np.empty(rows.shape, dtype=np.bool_)
            self._sums_in = np.empty((n, 3 * c))
        vote = self._sums_in[:, :c]
        abs_dev = self._sums_in[:, c : 2 * c]
        dev = np.subtract(rows, self.floor_db, out=self._dev)
        eventish = np.greater(dev, self._event_level, out=self._eventish)
        # +1 per background frame above, -1 per frame below, +event_weight per event frame.
        np.sign(dev, out=vote)
        np.copyto(vote, self._event_weight, where=eventish)
        # Spread: mean absolute deviation of the background frames (events left out).
        np.abs(dev, out=abs_dev)
        np.copyto(abs_dev, 0.0, where=eventish)
        np.copyto(self._sums_in[:, 2 * c :], eventish)
        sums = np.add.reduce(self._sums_in, axis=0)
        floor = self.floor_db + self._step_db * sums[:c]
        # A background that drops well below the floor is followed at once.
        np.copyto(floor, mean, where=mean < floor - self._allowance)
        n_quiet = n - sums[2 * c :]
        spread = self.spread_db
        mad = np.divide(sums[c : 2 * c], n_quiet, out=spread.copy(), where=n_quiet > 0)
        self.floor_db = floor
        self.spread_db = np.maximum(spread + SPREAD_SMOOTHING * (mad - spread), MIN_SPREAD_DB)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute what each frame compares against, after an update or a settings change."""
        if self.floor_db is None:
            self._thresholds = np.full(self.n_channels, math.inf)
            self._floors = np.full(self.n_channels, math.nan)
            return
        self._allowance = ALLOWANCE_SPREADS * self.spread_db
        self._thresholds = self.floor_db + self._allowance
        self._floors = self.floor_db
        self._event_level = self._allowance + self._threshold_db


def _median(rows: FloatArray) -> FloatArray:
    """`np.median(rows, axis=0)`, the same values: np.median's NaN check imports numpy.ma,
    1.2 MiB of resident memory for the life of the agent, for one call at start."""
    n = rows.shape[0]
    half = n // 2
    if n % 2:
        floor = np.partition(rows, half, axis=0)[half]
    else:
        part = np.partition(rows, (half - 1, half), axis=0)
        floor = (part[half - 1] + part[half]) / 2.0
    return np.where(np.isnan(rows).any(axis=0), np.nan, floor)
