"""Small builders shared by tests (real files, real store; no mocks)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from edge.messages.common import EventRecord
from edge.recorder import EventMeta, EventWriter, new_event_id
from edge.settings import DetectorSettings, RecordingSettings, StorageSettings
from edge.store import EventStore

SAMPLERATE = 16000


def tone(seconds: float, frequency_hz: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLERATE)) / SAMPLERATE
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)[:, None]


def open_store(data_dir: Path, **storage: float) -> EventStore:
    store = EventStore(data_dir, "testpi", StorageSettings(**storage))
    store.open()
    return store


def record_event(
    store: EventStore,
    seconds: float = 0.5,
    onset: datetime | None = None,
    fmt: str = "wav",
) -> EventRecord:
    """Write a real event file through the recorder and add it to the store."""
    seq = store.reserve_seq()
    onset = onset or datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC) + timedelta(seconds=seq)
    meta = EventMeta(
        event_id=new_event_id(),
        seq=seq,
        device_id=store.device_id,
        onset_time=onset,
        file_start_time=onset - timedelta(seconds=0.1),
        samplerate=SAMPLERATE,
        channels=1,
        recording=RecordingSettings(format=fmt, pre_roll_s=0.1, post_roll_s=0.1),  # type: ignore[arg-type]
        detector=DetectorSettings(),
    )
    writer = EventWriter(meta, store.directory_for(onset))
    writer.open()
    writer.write(tone(seconds))
    record = writer.finish(
        offset_time=onset + timedelta(seconds=seconds - 0.2),
        peak_dbfs=-10.5,
        noise_floor_dbfs=-60.0,
        split=False,
        clock_uncertain=False,
    )
    store.add(record, writer.part_path)
    return record


def fileless_event(store: EventStore, onset: datetime, seq: int | None = None) -> EventRecord:
    """An event recorded without a file (cheap: no audio written), added to the store; `seq`
    for one reserved earlier (an event saved after later ones)."""
    seq = store.reserve_seq() if seq is None else seq
    record = EventRecord(
        event_id=new_event_id(), seq=seq, device_id=store.device_id, onset_time=onset,
        offset_time=onset, duration_s=0.0, file_start_time=onset, pre_roll_s=0.0,
        post_roll_s=0.0, peak_dbfs=-3.0, noise_floor_dbfs=-60.0,
    )  # fmt: skip
    store.add(record, None)
    return record
