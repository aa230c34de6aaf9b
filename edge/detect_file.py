"""Offline detection: run the live detector over an audio file (`soundedge detect FILE`).

The file is read in blocks with soundfile (any format libsndfile reads, any channel count) and fed
to the same `Detector` the agent runs live, so a file and the live stream give the same events.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from edge.detector import DetectionEvent, Detector
from edge.errors import SoundedgeError
from edge.settings import DetectorSettings

__all__ = ["DetectFileError", "DetectedEvent", "detect_file", "iter_events", "keep_freed_memory"]

# Blocks of about 512 Ki frames (11 s at 48 kHz): the detector's fixed cost per block (~100 µs
# of small numpy calls) then vanishes against the per-sample work; with 4 Ki-frame blocks an hour
# of audio costs six times the CPU, with 256 Ki-frame blocks ~0.03 s more (docs/benchmarks.md).
# By default a block is a whole number of the detector's frames, so the detector never copies a
# block to join it to the partial frame left from the one before. Results do not depend on the
# block size.
DEFAULT_BLOCKSIZE = 524288
# glibc's malloc options (malloc.h) and what `keep_freed_memory` sets them to.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_FREED_BYTES = 64 << 20
_MMAP_FROM_BYTES = 32 << 20


class DetectFileError(SoundedgeError):
    """The audio file cannot be opened or read."""


@dataclass(frozen=True, slots=True)
class DetectedEvent:
    """A sound event found in a file; times in seconds from the start of the file."""

    onset_s: float
    offset_s: float
    duration_s: float
    peak_dbfs: float  # highest frame level within the event (plus calibration_db)
    noise_floor_dbfs: float  # noise floor when the event started (plus calibration_db)
    split: bool  # ended by max_event_s; the next event continues the same sound

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (times rounded to 0.1 ms, levels to 0.01 dB)."""
        data = asdict(self)
        for key in ("onset_s", "offset_s", "duration_s"):
            data[key] = round(data[key], 4)
        for key in ("peak_dbfs", "noise_floor_dbfs"):
            data[key] = round(data[key], 2)
        return data


def keep_freed_memory() -> None:
    """Have the C library keep freed memory for reuse (a batch process: `soundedge detect`).

    Each block makes some hundred kB of temporary arrays. With glibc's default thresholds
    (128 kB), memory freed at the end of a block is given back to the kernel and arrays of more
    than 128 kB are mapped afresh, so the next block pays page faults for it: 0.05-0.15 s of
    system time per hour of audio, depending on what the process allocated before. This sets
    the thresholds to tens of MB for the rest of the process; elsewhere than glibc it does
    nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has a mallopt that does nothing)
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)
    mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)


def _pair_events(
    events: list[DetectionEvent], samplerate: int, open_start: DetectionEvent | None
) -> tuple[list[DetectedEvent], DetectionEvent | None]:
    """Turn alternating start/end events into `DetectedEvent`s; return the still-open start."""
    done: list[DetectedEvent] = []
    for event in events:
        if event.kind == "start":
            open_start = event
            continue
        if open_start is None:  # the detector guarantees alternation; keep going if it did not
            continue
        onset_s = open_start.sample / samplerate
        offset_s = event.sample / samplerate
        done.append(
            DetectedEvent(
                onset_s=onset_s,
                offset_s=offset_s,
                duration_s=offset_s - onset_s,
                peak_dbfs=event.peak_dbfs,
                noise_floor_dbfs=open_start.noise_floor_dbfs,
                split=event.split,
            )
        )
        open_start = None
    return done, open_start


def iter_events(
    path: Path, settings: DetectorSettings, blocksize: int | None = None
) -> Iterator[DetectedEvent]:
    """Yield `DetectedEvent`s as the file is read (for printing while a long file runs).

    `blocksize` frames are read at a time; by default about `DEFAULT_BLOCKSIZE`, a whole number
    of analysis frames.
    """
    if blocksize is not None and blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    try:
        audio = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DetectFileError(f"{path}: cannot open audio file: {exc}") from exc
    with audio:
        detector = Detector(settings, audio.samplerate, audio.channels)
        if blocksize is None:
            step = detector.frame_samples
            blocksize = max(1, DEFAULT_BLOCKSIZE // step) * step
        open_start: DetectionEvent | None = None
        # 16-bit files are read as int16 (half the bytes, no conversion in libsndfile) and
        # scaled here into a reused float32 buffer.
        as_int16 = audio.subtype == "PCM_16"
        raw = np.empty((blocksize, audio.channels), dtype=np.int16 if as_int16 else np.float32)
        scaled = np.empty((blocksize if as_int16 else 0, audio.channels), dtype=np.float32)
        while True:
            try:
                got = audio.read(blocksize, dtype=raw.dtype.name, out=raw)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise DetectFileError(f"{path}: cannot read audio: {exc}") from exc
            n = got.shape[0]
            if n == 0:
                break
            if as_int16:
                # A plain conversion, then an in-place scaling: faster than one mixed-type
                # multiply, and the same values (both steps are exact).
                block = scaled[:n]
                np.copyto(block, raw[:n])
                block *= np.float32(1.0 / 32768.0)
            else:
                block = raw[:n]
            done, open_start = _pair_events(detector.process(block), audio.samplerate, open_start)
            yield from done
            if n < blocksize:
                break
        done, open_start = _pair_events(detector.flush(), audio.samplerate, open_start)
        yield from done


def detect_file(
    path: Path, settings: DetectorSettings, blocksize: int | None = None
) -> list[DetectedEvent]:
    """All events of an audio file, in order."""
    return list(iter_events(path, settings, blocksize))
