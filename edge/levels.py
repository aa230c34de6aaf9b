"""Frame levels per octave band, cheaply enough to run on every sample of a Raspberry Pi's input.

A frame of `frame_samples` samples (a multiple of 2**levels, aligned on absolute sample indices)
is split into octave bands by a Haar wavelet decomposition down to ~750 Hz: each level halves the
rate, the difference of neighbouring samples is the upper octave, the sum goes on to the next
level. The decomposition is orthogonal, so band energies add up to the frame energy, and it costs
about four vector passes over the input in total: a fraction of a per-frame FFT or of a full-rate
IIR filter (measured: `bench/detection_cost.py`).

The rest (below ~750 Hz, where mains hum, its harmonics and rumble live, and where Haar's gentle
slopes would let hum leak into the bands above it) is a signal at 1/32 of the rate. It gets a
Hann-windowed FFT over the last four frames (40 ms) at every frame, so hum stays in its own bins,
and is split into three bands: 375-750 Hz, 187-375 Hz and everything below.

Band limits and A-weighting: the low part is weighted bin by bin with the exact response; each
Haar band gets the mean power gain of the response over its octave, as in octave-band sound level
meters, and a band the response mostly removes (gain below one half) takes no part in detection
on its own. Frames are aligned on absolute sample indices and the low part's window history is
carried across blocks, so the levels of a frame never depend on how the input was cut into blocks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]

# The Haar decomposition stops once the rate of the remaining low part is at most this (1.5 kHz at
# 48 kHz, 1.38 kHz at 44.1 kHz, 2 kHz at 16 kHz).
_LOW_PART_MAX_RATE_HZ = 2000.0
# The low part's FFT spans this many frames (40 ms at 10 ms frames: 25 Hz bins at 48 kHz).
_LOW_WINDOW_FRAMES = 4
# Low part bands, as fractions of its rate: [lowest, 1/8), [1/8, 1/4), [1/4, 1/2].
_LOW_BAND_EDGES = (0.0, 0.125, 0.25, 0.5)
# A band whose mean gain is below this is left out of detection as a band of its own.
_ACTIVE_BAND_GAIN = 0.5
# Butterworth-like slopes of the band limits (order 4: 24 dB per octave).
_FILTER_ORDER = 4
# AES17: a full-scale sine reads 0 dBFS, so 10*log10(mean square) is offset by 10*log10(2).
_DBFS_OFFSET = 10.0 * math.log10(2.0)
# Power added before taking logs so digital silence gives a finite, very low level.
_TINY_POWER = 1e-20


def decomposition_levels(samplerate: int) -> int:
    """Number of Haar octave splits: until the low part's rate is at most 2 kHz."""
    return max(1, math.ceil(math.log2(samplerate / _LOW_PART_MAX_RATE_HZ)))


def frame_samples_for(frame_s: float, samplerate: int) -> int:
    """Frame length in samples: `frame_s` rounded to a multiple of 2**levels (at least one)."""
    step = 1 << decomposition_levels(samplerate)
    return max(step, step * round(frame_s * samplerate / step))


def a_weighting_power(freq_hz: FloatArray) -> FloatArray:
    """Power gain of the IEC 61672 A-weighting curve (1.0 at 1 kHz)."""
    f2 = np.square(freq_hz)
    num = 12194.0**2 * f2**2
    den = (f2 + 20.6**2) * np.sqrt((f2 + 107.7**2) * (f2 + 737.9**2)) * (f2 + 12194.0**2)
    amplitude = num / den
    # Normalise: the standard curve is +2.0 dB off at 1 kHz before its offset.
    return np.asarray(np.square(amplitude) * 10.0 ** (2.0 / 10.0), dtype=np.float64)


def response_power(
    freq_hz: FloatArray, highpass_hz: float | None, lowpass_hz: float | None, a_weighting: bool
) -> FloatArray:
    """Power gain at each frequency of the requested band limits and weighting."""
    gain = np.ones_like(freq_hz)
    safe = np.maximum(freq_hz, 1e-3)
    if highpass_hz is not None:
        gain /= 1.0 + (highpass_hz / safe) ** (2 * _FILTER_ORDER)
    if lowpass_hz is not None:
        gain /= 1.0 + (safe / lowpass_hz) ** (2 * _FILTER_ORDER)
    if a_weighting:
        gain *= a_weighting_power(safe)
    return gain


class BandLevels:
    """Mean-square power per octave band for each complete frame fed to it.

    `process(samples)` takes (n * frame_samples, channels) samples and returns an (n, bands)
    array of weighted mean-square powers (band 0 is the highest octave, the last band the lowest),
    the power of the channels averaged (so antiphase channels do not cancel and one loud channel
    counts as it should).
    """

    def __init__(
        self,
        samplerate: int,
        channels: int,
        frame_samples: int,
        highpass_hz: float | None,
        lowpass_hz: float | None,
        a_weighting: bool,
    ) -> None:
        self.samplerate = samplerate
        self.channels = channels
        self.levels = decomposition_levels(samplerate)
        self.low_rate_hz = samplerate / 2**self.levels
        # Bands, highest first: one per Haar level, then the three of the low part.
        self.n_bands = self.levels + len(_LOW_BAND_EDGES) - 1
        self._low_history = np.zeros((channels, 0), dtype=np.float32)
        self._work = np.empty((channels, 0), dtype=np.float32)
        # Unweighted power per low-part bin and frame of the last block (its mean over frames
        # is the sound heard lately, for set_response), and work buffers of the low part.
        self._low_power: npt.NDArray[np.floating] = np.zeros((0, 0))
        self._low_buffers: tuple[npt.NDArray[Any], ...] | None = None
        self._response: tuple[float | None, float | None, bool] = (
            highpass_hz,
            lowpass_hz,
            a_weighting,
        )
        self.set_frame_samples(frame_samples)

    @property
    def band_edges_hz(self) -> list[tuple[float, float]]:
        """(low, high) nominal edges of each band, highest first."""
        edges = [
            (self.samplerate / 2 ** (lvl + 1), self.samplerate / 2**lvl)
            for lvl in range(1, self.levels + 1)
        ]
        fractions = _LOW_BAND_EDGES
        for i in range(len(fractions) - 1, 0, -1):
            edges.append((fractions[i - 1] * self.low_rate_hz, fractions[i] * self.low_rate_hz))
        return edges

    @property
    def band_samples_per_frame(self) -> list[float]:
        """Independent values per frame behind each band's level (how steady it is)."""
        haar = [self.frame_samples / 2**lvl for lvl in range(1, self.levels + 1)]
        # The low part's bands are already averaged over their 40 ms window.
        low = [float(self._low_window)] * (len(_LOW_BAND_EDGES) - 1)
        return haar + low

    def set_frame_samples(self, frame_samples: int) -> None:
        """Set the frame length (a multiple of 2**levels); the low part's history is kept."""
        if frame_samples % (2**self.levels):
            raise ValueError(f"frame_samples must be a multiple of {2**self.levels}")
        self.frame_samples = frame_samples
        self._low_per_frame = frame_samples // 2**self.levels
        self._low_window = _LOW_WINDOW_FRAMES * self._low_per_frame
        keep = self._low_window - self._low_per_frame
        history = self._low_history[:, -keep:] if keep else self._low_history[:, :0]
        missing = keep - history.shape[1]
        if missing > 0:
            history = np.concatenate(
                [np.zeros((self.channels, missing), dtype=np.float32), history], axis=1
            )
        self._low_history = history
        self._low_buffers = None  # their shape depends on the window
        self._hann = np.hanning(self._low_window + 2)[1:-1].astype(np.float32)
        self.set_response(*self._response)

    def set_response(
        self, highpass_hz: float | None, lowpass_hz: float | None, a_weighting: bool
    ) -> FloatArray:
        """Change band limits or weighting; the low part's history is kept.

        Returns how much each band's level changes for the sound heard lately, in dB: exact for
        the Haar bands (a fixed weight each), from the last block's spectrum for the low part.
        """
        old_haar = getattr(self, "_haar_weights", None)
        old_low_gain = getattr(self, "_low_gain", None)
        self._response = (highpass_hz, lowpass_hz, a_weighting)
        weights = []
        for low, high in self.band_edges_hz[: self.levels]:
            # Log-spaced: the weight of a band is that of its (geometric) middle, as in octave
            # band sound level meters, not that of its loudest edge.
            grid = np.geomspace(low, high, 65)
            weights.append(
                float(np.mean(response_power(grid, highpass_hz, lowpass_hz, a_weighting)))
            )
        # Unnormalised Haar: a level-l coefficient carries 2**l times its energy. Divide by the
        # samples per frame and the channels to get a mean square.
        per_level = np.asarray([2.0**-lvl for lvl in range(1, self.levels + 1)])
        self._haar_scale = per_level * weights / (self.frame_samples * self.channels)
        # Low part: weight each FFT bin by the exact response, and scale so that the sum over
        # a band's bins is the band's mean square in the original signal. The low part is the
        # sum of 2**levels samples, which multiplies its power by 4**levels.
        n_win = self._low_window
        bins_hz = np.fft.rfftfreq(n_win, 1.0 / self.low_rate_hz)
        doubled = np.full(bins_hz.size, 2.0)
        doubled[0] = 1.0
        if n_win % 2 == 0:
            doubled[-1] = 1.0
        gain = response_power(bins_hz, highpass_hz, lowpass_hz, a_weighting)
        norm = doubled / (n_win * float(np.sum(self._hann**2)) * 4.0**self.levels * self.channels)
        # Each low band is a run of bins; reduceat sums the weighted bins of each run.
        edges_hz = np.asarray(_LOW_BAND_EDGES[1:-1]) * self.low_rate_hz
        starts = np.searchsorted(bins_hz, edges_hz, side="left")
        self._low_bin_weights = gain * norm
        self._low_band_starts = np.concatenate([[0], starts]).astype(np.intp)
        low_weights = [
            float(np.mean(gain[(bins_hz >= lo) & (bins_hz <= hi)]))
            for lo, hi in self.band_edges_hz[self.levels :]
        ]
        # Mean power gain per band: the detector shifts its noise floors by the change of it
        # when the response changes while running.
        self.band_gain = np.asarray(weights + low_weights)
        self.band_active = self.band_gain >= _ACTIVE_BAND_GAIN
        self._haar_weights = np.asarray(weights)
        self._low_gain = gain
        change = np.zeros(self.n_bands)
        if old_haar is not None:
            change[: self.levels] = _ratio_db(self._haar_weights, old_haar)
        spectrum = self._low_power.mean(axis=0) if self._low_power.shape[0] else np.zeros(0)
        if (
            old_low_gain is not None
            and old_low_gain.size == gain.size
            and spectrum.size == gain.size
        ):
            before = np.add.reduceat(spectrum * old_low_gain, self._low_band_starts)
            after = np.add.reduceat(spectrum * gain, self._low_band_starts)
            change[self.levels :] = _ratio_db(after, before)[::-1]
        return change

    def process(self, samples: Float32Array) -> FloatArray:
        """Weighted mean square per band for each complete frame of (frames, channels) samples."""
        n_frames = samples.shape[0] // self.frame_samples
        out = np.empty((n_frames, self.n_bands), dtype=np.float64)
        if n_frames == 0:
            return out
        # (channels, samples) view; even and odd samples are strided views of it.
        approx: Float32Array = samples[: n_frames * self.frame_samples].T
        half = approx.shape[1] // 2
        if self._work.shape[1] < 3 * half:
            # Reused between calls: fresh multi-megabyte arrays on every block would cost more
            # in page faults than the arithmetic.
            self._work = np.empty((self.channels, 3 * half), dtype=np.float32)
        detail_buf = self._work[:, :half]
        approx_bufs = (self._work[:, half : 2 * half], self._work[:, 2 * half : 3 * half])
        for level in range(1, self.levels + 1):
            even = approx[:, 0::2]
            odd = approx[:, 1::2]
            n = even.shape[1]
            detail = np.subtract(even, odd, out=detail_buf[:, :n])
            approx = np.add(even, odd, out=approx_bufs[level % 2][:, :n])
            frames = detail.reshape(self.channels, n_frames, -1)
            # Energy per frame summed over channels (the scale is applied below).
            out[:, level - 1] = np.einsum("cfi,cfi->f", frames, frames)
        out[:, : self.levels] *= self._haar_scale
        out[:, self.levels :] = self._low_part_power(approx, n_frames)
        return out

    def _low_part_power(self, low: Float32Array, n_frames: int) -> FloatArray:
        """Band powers of the low part from a Hann-windowed FFT over the last few frames."""
        extended = np.concatenate([self._low_history, low], axis=1)
        keep = self._low_window - self._low_per_frame
        self._low_history = extended[:, extended.shape[1] - keep :]
        # One window ending at each frame's end: a strided view, no copy.
        step = extended.strides[1]
        windows = np.lib.stride_tricks.as_strided(
            extended,
            shape=(self.channels, n_frames, self._low_window),
            strides=(extended.strides[0], self._low_per_frame * step, step),
            writeable=False,
        )
        # The arrays of this part are a few hundred kB per block: fresh ones would be mapped
        # and unmapped by malloc on every block (page faults cost more than the FFT), so they
        # are kept between blocks.
        bufs = self._low_buffers
        if bufs is None or bufs[0].shape[1] < n_frames:
            n_bins = self._low_window // 2 + 1
            bufs = self._low_buffers = (
                np.empty((self.channels, n_frames, self._low_window), dtype=np.float32),
                np.empty((self.channels, n_frames, n_bins), dtype=np.complex64),
                np.empty((self.channels, n_frames, n_bins), dtype=np.complex64),
                np.empty((n_frames, n_bins), dtype=np.float64),
            )
        windowed = np.multiply(windows, self._hann, out=bufs[0][:, :n_frames])
        spectrum = np.fft.rfft(windowed, out=bufs[1][:, :n_frames])
        squared = np.multiply(
            spectrum, np.conjugate(spectrum, out=bufs[2][:, :n_frames]), out=bufs[2][:, :n_frames]
        )
        power = squared.real
        # Channels add by power (a single channel skips the reduction).
        power = power.sum(axis=0) if self.channels > 1 else power[0]
        self._low_power = power  # the mean spectrum is taken from it if the response changes
        # Sums over runs of bins in a fixed order per output, whatever the number of frames
        # (a BLAS matrix product does not promise that).
        weighted = np.multiply(power, self._low_bin_weights, out=bufs[3][:n_frames])
        bands = np.add.reduceat(weighted, self._low_band_starts, axis=1)
        # Highest band first, like the Haar bands.
        return np.asarray(bands[:, ::-1], dtype=np.float64)


def _ratio_db(new: FloatArray, old: FloatArray) -> FloatArray:
    """10*log10(new / old), bounded to ±60 dB (a band switched off or on)."""
    ratio = (new + 1e-12) / (old + 1e-12)
    return np.asarray(np.clip(10.0 * np.log10(ratio), -60.0, 60.0), dtype=np.float64)


def power_to_db(power: FloatArray) -> FloatArray:
    """Mean-square power to dBFS (AES17: a full-scale sine is 0 dBFS)."""
    return np.asarray(10.0 * np.log10(power + _TINY_POWER) + _DBFS_OFFSET, dtype=np.float64)
