"""Offline detection: run the live detector over an audio file (`soundedge detect FILE`).

The file is read in blocks with soundfile (any format libsndfile reads, any channel count) and fed
to the same `Detector` the agent runs live, so a file and the live stream give the same events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from edge.detector import DetectionEvent, Detector
from edge.errors import SoundedgeError
from edge.settings import DetectorSettings

__all__ = ["DetectFileError", "DetectedEvent", "detect_file", "iter_events"]

# Blocks of 256 Ki frames (5.5 s at 48 kHz): the detector's fixed cost per block (~150 µs of
# small numpy calls) then vanishes against the per-sample work; with 4 Ki-frame blocks an hour of
# audio costs six times the CPU (docs/benchmarks.md). Results do not depend on it.
DEFAULT_BLOCKSIZE = 262144


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
    path: Path, settings: DetectorSettings, blocksize: int = DEFAULT_BLOCKSIZE
) -> Iterator[DetectedEvent]:
    """Yield `DetectedEvent`s as the file is read (for printing while a long file runs)."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    try:
        audio = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DetectFileError(f"{path}: cannot open audio file: {exc}") from exc
    with audio:
        detector = Detector(settings, audio.samplerate, audio.channels)
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
                block = np.multiply(raw[:n], np.float32(1.0 / 32768.0), out=scaled[:n])
            else:
                block = raw[:n]
            done, open_start = _pair_events(detector.process(block), audio.samplerate, open_start)
            yield from done
            if n < blocksize:
                break
        done, open_start = _pair_events(detector.flush(), audio.samplerate, open_start)
        yield from done


def detect_file(
    path: Path, settings: DetectorSettings, blocksize: int = DEFAULT_BLOCKSIZE
) -> list[DetectedEvent]:
    """All events of an audio file, in order."""
    return list(iter_events(path, settings, blocksize))
