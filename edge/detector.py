"""The sound event detector: pure, block-size independent, settings changeable while running.

Pipeline, per frame of ~10 ms (see `docs/detector.md`):

1. `BandLevels`: mean-square power per octave band, with band limits and A-weighting, channels
   averaged by power.
2. Short smoothing of the 750-3000 Hz bands (only 15-30 samples per frame there) and conversion
   to dB, giving one level per channel: the broadband level and each band's level.
3. `NoiseFloor`: per channel a running median floor and the background's own fluctuation; the
   channel's threshold is floor + a multiple of the fluctuation.
4. Excess = the largest (level - threshold) over all channels. An event starts when the excess
   reaches `threshold_db` and the broadband level `min_level_dbfs`; it lasts while the excess
   stays at or above `release_db`, and ends once it has stayed below for `hang_s`. The onset is
   back-dated to where the excess first rose above `release_db` and placed within that frame
   from the attack of the high-passed samples.

Frames are aligned on absolute sample indices and every stage keeps its own history, so the
events depend only on the samples, never on how they were cut into blocks. All work per block is
vectorised over its frames; the event state machine only visits the frames where something
happens (an event starts, is confirmed, is split, or its hang time runs out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from edge.levels import BandLevels, FloatArray, frame_samples_for, power_to_db
from edge.noisefloor import NoiseFloor
from edge.settings import DetectorSettings

__all__ = ["DetectionEvent", "Detector", "DetectorStatus"]

# Frames of history kept to back-date an onset to where the sound first rose above release_db.
_ONSET_LOOKBACK_FRAMES = 8
# The onset frame is split into this many parts to place the onset within it.
_ONSET_PARTS = 8
# A part counts as the onset when its high-passed energy is this many dB above the frame before
# plus threshold_db (8 parts of a noisy background differ by up to ~3 dB among themselves).
_ONSET_PART_MARGIN_DB = 3.0
# Longest smoothing, in frames, of a band's power. A Haar band with few samples per frame (750-1500
# Hz: 15 at 48 kHz) has a jittery level; averaging it over a few frames steadies it without
# delaying the other bands. (The bands below 750 Hz are already averaged by their 40 ms window.)
_MAX_SMOOTHING_FRAMES = 4
# Samples per frame a band should have for its level to be steady without smoothing.
_STEADY_BAND_SAMPLES = 32


@dataclass(frozen=True, slots=True)
class DetectionEvent:
    """A start or end of a sound event."""

    kind: Literal["start", "end"]
    sample: int  # absolute onset (start) or offset (end) sample, from the first sample ever fed
    peak_dbfs: float  # start: the level that triggered; end: the peak frame level of the event
    noise_floor_dbfs: float
    split: bool = False  # end caused by max_event_s; a start at the same sample follows


@dataclass(frozen=True, slots=True)
class DetectorStatus:
    """The detector's current view of the sound, for health and level messages."""

    level_dbfs: float  # level of the most recent frame
    peak_dbfs: float  # highest frame level since the last reset_peak()
    noise_floor_dbfs: float
    active: bool  # an event is open (its start was emitted, its end not yet)
    samples_seen: int


class Detector:
    """Feed blocks of samples, get event starts and ends back."""

    def __init__(self, settings: DetectorSettings, samplerate: int, channels: int) -> None:
        if samplerate <= 0:
            raise ValueError(f"samplerate must be positive, got {samplerate}")
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        self.samplerate = samplerate
        self.channels = channels
        self._settings = settings
        self._frame_samples = frame_samples_for(settings.frame_s, samplerate)
        self._bands = BandLevels(
            samplerate,
            channels,
            self._frame_samples,
            settings.highpass_hz,
            settings.lowpass_hz,
            settings.a_weighting,
        )
        n_bands = self._bands.n_bands
        self._floor = NoiseFloor(
            n_bands + 1, self._frame_s, settings.threshold_db, settings.floor_window_s
        )
        self._setup_smoothing()
        self._set_detect_cols()
        # Samples not yet making up a whole frame.
        self._pending = np.zeros((0, channels), dtype=np.float32)
        self._joined = np.zeros((0, channels), dtype=np.float32)
        self._frames_start = 0  # absolute sample of the first pending sample
        self._samples_seen = 0
        # Samples of the most recent frames (to place an onset within its frame), oldest first.
        self._recent_samples = np.zeros((0, channels), dtype=np.float32)
        # The block being analysed (empty between calls, so it is not kept alive).
        self._block_samples = self._recent_samples
        # Excess of the most recent frames (onset look-back), oldest first.
        self._recent_excess = np.full(_ONSET_LOOKBACK_FRAMES, -math.inf)
        self._level_db = -math.inf
        self._peak_db = -math.inf
        self._floor_db = math.nan
        # Event state: idle, candidate (onset seen, not yet min_event_s long) or active.
        self._state: Literal["idle", "candidate", "active"] = "idle"
        self._last_end = 0  # offset of the last event: a new onset never goes before it
        self._onset = 0
        self._last_above_end = 0
        self._event_peak_db = -math.inf
        self._trigger_db = -math.inf
        self._trigger_floor_db = math.nan
        self._apply_timing(settings)

    # ----------------------------------------------------------------- settings
    @property
    def settings(self) -> DetectorSettings:
        return self._settings

    @property
    def frame_samples(self) -> int:
        """Samples per analysis frame (frame_s rounded to the band decomposition's step)."""
        return self._frame_samples

    @property
    def _frame_s(self) -> float:
        return self._frame_samples / self.samplerate

    def _apply_timing(self, settings: DetectorSettings) -> None:
        sr = self.samplerate
        self._min_event_samples = round(settings.min_event_s * sr)
        self._hang_samples = round(settings.hang_s * sr)
        self._max_event_samples = max(1, round(settings.max_event_s * sr))
        self._calibration_db = settings.calibration_db

    def _setup_smoothing(self) -> None:
        """Moving averages for the bands with few samples per frame (a run of mid bands).

        weights[j, k] applies to the frame j back in band smooth_lo + k; other bands pass as is.
        """
        lengths = [
            min(_MAX_SMOOTHING_FRAMES, max(1, math.ceil(_STEADY_BAND_SAMPLES / n)))
            for n in self._bands.band_samples_per_frame
        ]
        smoothed = [band for band, length in enumerate(lengths) if length > 1]
        lo, hi = (smoothed[0], smoothed[-1] + 1) if smoothed else (0, 0)
        weights = np.zeros((_MAX_SMOOTHING_FRAMES, hi - lo), dtype=np.float64)
        for k, length in enumerate(lengths[lo:hi]):
            weights[:length, k] = 1.0 / length
        self._smooth_lo, self._smooth_hi = lo, hi
        self._smooth_weights = weights
        self._smooth_history = np.zeros((_MAX_SMOOTHING_FRAMES - 1, hi - lo), dtype=np.float64)

    def _shift_floors(self, band_change_db: FloatArray) -> None:
        """Carry the floors over a change of band limits or weighting.

        Each band's floor moves by its change of level, so a new filter neither looks like an
        event nor hides one until the floor has caught up. The broadband floor moves by the
        change of the band floors' power sum.
        """
        floors = self._floor.floor_db
        if floors is None or not band_change_db.any():
            return
        band_power = 10.0 ** (floors[1:] / 10.0)
        changed = (band_power * 10.0 ** (band_change_db / 10.0)).sum()
        broadband_change = 10.0 * np.log10(changed / band_power.sum())
        self._floor.shift(np.concatenate([[broadband_change], band_change_db]))

    def _set_detect_cols(self) -> None:
        """Channels that take part in detection (None: all): broadband and the kept bands."""
        active = np.concatenate([[True], self._bands.band_active])
        self._detect_cols = None if active.all() else np.flatnonzero(active)

    def update_settings(self, settings: DetectorSettings) -> None:
        """Apply new settings at once, keeping the noise floor and any open event."""
        new_frame = frame_samples_for(settings.frame_s, self.samplerate)
        if new_frame != self._frame_samples:
            # Frames restart at the first sample not yet analysed. Levels are mean squares
            # (per sample), so the floors stay meaningful; the short smoothing restarts.
            self._frame_samples = new_frame
            self._bands.set_frame_samples(new_frame)
            self._setup_smoothing()
        change_db = self._bands.set_response(
            settings.highpass_hz, settings.lowpass_hz, settings.a_weighting
        )
        self._set_detect_cols()
        self._shift_floors(change_db)
        self._floor.configure(self._frame_s, settings.threshold_db, settings.floor_window_s)
        self._apply_timing(settings)
        self._settings = settings

    # ------------------------------------------------------------------- status
    @property
    def status(self) -> DetectorStatus:
        return DetectorStatus(
            level_dbfs=self._level_db + self._calibration_db,
            peak_dbfs=self._peak_db + self._calibration_db,
            noise_floor_dbfs=self._floor_db + self._calibration_db,
            active=self._state == "active",
            samples_seen=self._samples_seen,
        )

    def reset_peak(self) -> None:
        self._peak_db = -math.inf

    # ------------------------------------------------------------------ process
    def process(self, block: npt.NDArray[np.floating]) -> list[DetectionEvent]:
        """Analyse a (frames, channels) block of float samples; return events it completes."""
        if block.ndim == 1 and self.channels == 1:
            block = block.reshape(-1, 1)
        if block.ndim != 2 or block.shape[1] != self.channels:
            raise ValueError(
                f"expected a (frames, {self.channels}) block, got shape {tuple(block.shape)}"
            )
        if block.dtype.kind != "f":
            raise ValueError(f"expected float samples (full scale 1.0), got {block.dtype}")
        self._samples_seen += block.shape[0]
        if self._pending.shape[0]:
            total = self._pending.shape[0] + block.shape[0]
            if self._joined.shape[0] < total:
                # Reused between blocks (a fresh large array per block costs page faults).
                self._joined = np.empty((total, self.channels), dtype=np.float32)
            data = np.concatenate(
                [self._pending, block], out=self._joined[:total], casting="same_kind"
            )
        else:
            data = block.astype(np.float32, copy=False)
        n_frames = data.shape[0] // self._frame_samples
        used = n_frames * self._frame_samples
        self._pending = data[used:].copy()
        if n_frames == 0:
            return []
        first_frame_sample = self._frames_start
        self._frames_start += used
        return self._analyse(data[:used], first_frame_sample, n_frames)

    def flush(self) -> list[DetectionEvent]:
        """End of input: close an open event at its last loud frame; drop a too-short one."""
        events: list[DetectionEvent] = []
        if self._state == "active":
            events.append(
                self._end_event(self._last_above_end, split=False, floor_db=self._floor_db_now())
            )
        self._state = "idle"
        return events

    def _analyse(
        self, samples: npt.NDArray[np.float32], first_sample: int, n_frames: int
    ) -> list[DetectionEvent]:
        band_power = self._bands.process(samples)
        broadband_db = power_to_db(band_power.sum(axis=1))
        # Channels: 0 is the broadband level, 1.. the bands (a few mid bands smoothed).
        channels = np.empty((n_frames, band_power.shape[1] + 1), dtype=np.float64)
        channels[:, 1:] = band_power
        lo, hi = self._smooth_lo, self._smooth_hi
        if hi > lo:
            extended = np.concatenate([self._smooth_history, band_power[:, lo:hi]])
            depth = _MAX_SMOOTHING_FRAMES - 1
            self._smooth_history = extended[n_frames:]
            smoothed = extended[depth:] * self._smooth_weights[0]
            for back in range(1, _MAX_SMOOTHING_FRAMES):
                smoothed += (
                    extended[depth - back : depth - back + n_frames] * (self._smooth_weights[back])
                )
            channels[:, 1 + lo : 1 + hi] = smoothed
        channels[:, 0] = channels[:, 1:].sum(axis=1)
        channel_db = power_to_db(channels)
        thresholds, floors = self._floor.feed(channel_db)
        over = channel_db - thresholds
        if self._detect_cols is not None:
            over = over[:, self._detect_cols]
        excess = over.max(axis=1)
        floor_db = floors[:, 0]

        self._level_db = float(broadband_db[-1])
        self._peak_db = max(self._peak_db, float(broadband_db.max()))
        self._block_samples = samples
        events = self._run_events(first_sample, excess, broadband_db, floor_db)
        self._block_samples = self._recent_samples[:0]
        keep = (_ONSET_LOOKBACK_FRAMES + 1) * self._frame_samples
        if samples.shape[0] >= keep:
            self._recent_samples = samples[-keep:].copy()
        else:
            self._recent_samples = np.concatenate([self._recent_samples, samples])[-keep:]
        self._floor_db = float(floor_db[-1])
        lookback = np.concatenate([self._recent_excess, excess])
        self._recent_excess = lookback[-_ONSET_LOOKBACK_FRAMES:]
        return events

    def _run_events(
        self,
        first_sample: int,
        excess: FloatArray,
        broadband_db: FloatArray,
        floor_db: FloatArray,
    ) -> list[DetectionEvent]:
        s = self._settings
        start_ok = (excess >= s.threshold_db) & (
            broadband_db + self._calibration_db >= s.min_level_dbfs
        )
        if self._state == "idle" and not start_ok.any():
            return []
        events: list[DetectionEvent] = []
        n = self._frame_samples
        above_release = excess >= s.release_db
        level_list = broadband_db.tolist()
        i = 0
        n_frames = len(level_list)
        while i < n_frames:
            if self._state == "idle":
                # Jump to the next frame that can start an event.
                nxt = _next_true(start_ok, i)
                if nxt < 0:
                    break
                i = nxt
                self._state = "candidate"
                onset_frame = self._onset_frame(excess, i)
                onset = self._onset_within_frame(first_sample, onset_frame)
                self._onset = max(onset, self._last_end)
                self._last_above_end = first_sample + (i + 1) * n
                self._event_peak_db = level_list[i]
                self._trigger_db = level_list[i]
                self._trigger_floor_db = float(floor_db[i])
                self._check_confirm(events)
                i += 1
                continue
            # Within an event, runs of frames are taken whole: only the frames where something
            # happens (the start is confirmed, a split, the hang time runs out) are visited.
            if above_release[i]:
                run_end = _next_false(above_release, i)
                if run_end < 0:
                    run_end = n_frames
                # The frame at which the event must act: confirm its start or split it.
                if self._state == "candidate":
                    due = self._min_event_samples
                else:
                    due = self._max_event_samples
                act = max(i, _first_frame_ending_at(self._onset + due, first_sample, n))
                last = min(act, run_end)  # frames i..last-1 only extend the event
                if last > i:
                    self._last_above_end = first_sample + last * n
                    self._event_peak_db = max(self._event_peak_db, *level_list[i:last])
                    i = last
                if i == run_end:
                    continue
                frame_end = first_sample + (i + 1) * n
                self._last_above_end = frame_end
                self._event_peak_db = max(self._event_peak_db, level_list[i])
                if self._state == "active":
                    split_at = self._onset + self._max_event_samples
                    events.append(
                        self._end_event(split_at, split=True, floor_db=float(floor_db[i]))
                    )
                    self._onset = split_at
                    self._event_peak_db = level_list[i]
                    self._trigger_db = level_list[i]
                    self._trigger_floor_db = float(floor_db[i])
                    self._state = "active"
                    events.append(self._start_event())
                else:
                    self._check_confirm(events)
                i += 1
                continue
            # Below release_db: the event ends once the hang time has passed, unless the
            # excess comes back first.
            back = _next_true(above_release, i)
            end = max(
                i,
                _first_frame_ending_at(self._last_above_end + self._hang_samples, first_sample, n),
            )
            if back >= 0 and back <= end:
                i = back
                continue
            if end >= n_frames:
                break
            if self._state == "active":
                events.append(
                    self._end_event(
                        self._last_above_end, split=False, floor_db=float(floor_db[end])
                    )
                )
            self._state = "idle"
            i = end + 1
        return events

    def _onset_frame(self, excess: FloatArray, trigger: int) -> int:
        """Back-date the trigger frame to the first of the run of frames above release_db."""
        release = self._settings.release_db
        frame = trigger
        history = self._recent_excess
        while frame > trigger - _ONSET_LOOKBACK_FRAMES:
            prev = frame - 1
            value = excess[prev] if prev >= 0 else history[len(history) + prev]
            if value < release:
                break
            frame = prev
        return frame

    def _onset_within_frame(self, first_sample: int, frame: int) -> int:
        """Onset sample inside the onset frame (relative index, may be < 0: an earlier block).

        The frame and the one before are high-passed (first difference, which brings out
        attacks) and the frame is cut into parts; the onset is the first part whose energy
        stands threshold_db + 3 dB above the frame before. A sound without a clear attack in
        that signal (a rumble, a soft tone in noise) keeps the frame's start.
        """
        n = self._frame_samples
        frame_start = first_sample + frame * n
        recent = self._recent_samples
        context_start = first_sample - recent.shape[0]
        begin = frame_start - n - context_start  # the frame before, in context indices
        if begin < 0:
            return frame_start
        block = self._block_samples
        if frame >= 1:
            context = block[(frame - 1) * n : (frame + 1) * n]
        elif frame == 0:
            context = np.concatenate([recent[-n:], block[:n]])
        else:
            context = np.concatenate([recent, block[: n * 2]])[begin : begin + 2 * n]
        part = n // _ONSET_PARTS
        if part < 1:
            return frame_start
        # energy[m]: high-passed power at context sample m + 1 (channels averaged).
        energy = np.square(np.subtract(context[1:], context[:-1]))
        energy = energy[:, 0] if self.channels == 1 else energy.mean(axis=1)
        before = float(energy[: n - 1].mean())
        head = n - part * _ONSET_PARTS  # samples at the frame's start left out of the parts
        parts = energy[n - 1 + head :].reshape(_ONSET_PARTS, part).mean(axis=1)
        factor = 10.0 ** ((self._settings.threshold_db + _ONSET_PART_MARGIN_DB) / 10.0)
        loud = np.flatnonzero(parts > before * factor)
        if loud.size == 0:
            return frame_start
        return frame_start + head + int(loud[0]) * part

    def _check_confirm(self, events: list[DetectionEvent]) -> None:
        if self._last_above_end - self._onset >= self._min_event_samples:
            self._state = "active"
            events.append(self._start_event())

    def _start_event(self) -> DetectionEvent:
        return DetectionEvent(
            kind="start",
            sample=self._onset,
            peak_dbfs=self._trigger_db + self._calibration_db,
            noise_floor_dbfs=self._trigger_floor_db + self._calibration_db,
        )

    def _end_event(self, sample: int, *, split: bool, floor_db: float) -> DetectionEvent:
        """An end; `floor_db` is the broadband floor in effect at the frame that ended it (so
        it does not depend on how far past that frame the current block goes)."""
        self._state = "idle"
        self._last_end = sample
        return DetectionEvent(
            kind="end",
            sample=sample,
            peak_dbfs=self._event_peak_db + self._calibration_db,
            noise_floor_dbfs=floor_db + self._calibration_db,
            split=split,
        )

    def _floor_db_now(self) -> float:
        floor = self._floor.floor_db
        return float(floor[0]) if floor is not None else math.nan


def _next_true(mask: npt.NDArray[np.bool_], start: int) -> int:
    """Index of the first True at or after start, or -1."""
    # argmax stops at the first True; it gives 0 when there is none.
    found = int(mask[start:].argmax()) + start if start < mask.size else -1
    return found if found >= 0 and mask[found] else -1


def _next_false(mask: npt.NDArray[np.bool_], start: int) -> int:
    """Index of the first False at or after start, or -1."""
    found = int(mask[start:].argmin()) + start if start < mask.size else -1
    return found if found >= 0 and not mask[found] else -1


def _first_frame_ending_at(sample: int, first_sample: int, frame_samples: int) -> int:
    """Index of the first frame (of a block starting at first_sample) ending at or after sample."""
    return -((first_sample - sample) // frame_samples) - 1
