"""Event files, the event log, seq across restarts, crash recovery and retention."""

import gc
import json
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import soundfile as sf

from edge.fileio import sha256_of
from edge.recorder import EventMeta, EventWriter, new_event_id, read_guano
from edge.settings import DetectorSettings, RecordingSettings
from edge.store import EventStore, event_file_name
from tests.helpers import SAMPLERATE, record_event, tone

Opener = Callable[..., EventStore]


def test_file_name_has_device_utc_time_and_seq() -> None:
    onset = datetime(2026, 11, 25, 7, 8, 9, 123000, tzinfo=UTC)
    assert event_file_name("pi1", onset, 42, "wav") == "pi1_20261125T070809.123Z_000042.wav"


def test_event_file_lands_under_its_day_with_checksum_and_metadata(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    record = record_event(store, seconds=0.5)
    assert record.file is not None
    path = store.path_of(record)
    assert path.parent == tmp_path / "events" / "2026-11-25"
    assert path.exists()
    assert not list(path.parent.glob(".*.part"))
    assert sha256_of(path) == record.file.sha256
    assert path.stat().st_size == record.file.size_bytes
    info = sf.info(str(path))
    assert info.samplerate == SAMPLERATE
    assert info.subtype == "PCM_16"
    guano = read_guano(path)
    assert guano["soundedge|Event ID"] == record.event_id
    assert guano["soundedge|Seq"] == str(record.seq)
    assert guano["soundedge|Device"] == "testpi"
    assert "soundedge|Detector threshold_db" in guano


def test_flac_event_carries_text_metadata(tmp_path: Path, store_opener: Opener) -> None:
    store = store_opener(tmp_path)
    record = record_event(store, fmt="flac")
    path = store.path_of(record)
    with sf.SoundFile(str(path)) as handle:
        assert handle.format == "FLAC"
        assert record.event_id in handle.comment


def test_seq_is_monotonic_across_restarts(tmp_path: Path, store_opener: Opener) -> None:
    store = store_opener(tmp_path)
    first = [record_event(store).seq for _ in range(3)]
    reserved_unused = store.reserve_seq()  # an event that started but never finished
    store.close()
    reopened = store_opener(tmp_path)
    assert first == [1, 2, 3]
    assert reopened.newest_seq == 3
    assert reopened.reserve_seq() == reserved_unused + 1


def test_log_replay_restores_records_and_collected_marks(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    records = [record_event(store) for _ in range(3)]
    assert store.mark_collected(records[1].event_id)
    store.close()
    reopened = store_opener(tmp_path)
    assert [r.event_id for r in reopened.records_since(0, 10)] == [r.event_id for r in records]
    assert reopened.is_collected(records[1].event_id)
    assert not reopened.is_collected(records[0].event_id)
    assert [r.seq for r in reopened.records_since(1, 1)] == [2]


def test_truncated_last_log_line_is_dropped_and_log_stays_appendable(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    kept = record_event(store)
    store.close()
    with (tmp_path / "events.jsonl").open("ab") as handle:
        handle.write(b'{"kind":"event","record":{"schema_version":1,"ev')  # kill -9 mid-append
    reopened = store_opener(tmp_path)
    assert [r.event_id for r in reopened.records_since(0, 10)] == [kept.event_id]
    later = record_event(reopened)
    reopened.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert store_opener(tmp_path).get(later.event_id) == later


def test_interrupted_rename_is_completed_on_open(tmp_path: Path, store_opener: Opener) -> None:
    store = store_opener(tmp_path)
    record = record_event(store)
    final = store.path_of(record)
    store.close()
    # A crash after the log append but before the rename leaves only the .part file.
    final.rename(final.with_name(f".{final.name}.part"))
    reopened = store_opener(tmp_path)
    assert final.exists()
    assert reopened.file_for(record.event_id) == final


def test_partial_file_without_record_is_salvaged_not_dropped(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    record = record_event(store)
    final = store.path_of(record)
    store.close()
    # Simulate kill -9 while event 9 was being written: a .part file, no log record.
    orphan = final.with_name(".testpi_20261125T120009.000Z_000009.wav.part")
    orphan.write_bytes(final.read_bytes())
    reopened = store_opener(tmp_path)
    salvaged = reopened.records_since(record.seq, 10)
    assert [r.seq for r in salvaged] == [9]
    # Not a copy of event 1's file: its comment names another seq, so the id is a new one.
    assert salvaged[0].event_id != record.event_id
    assert salvaged[0].clock_uncertain
    assert salvaged[0].file is not None
    path = reopened.path_of(salvaged[0])
    assert sha256_of(path) == salvaged[0].file.sha256
    assert not orphan.exists()
    assert reopened.counters.files_salvaged == 1


def test_file_for_refuses_invalid_and_unknown_ids(tmp_path: Path, store_opener: Opener) -> None:
    store = store_opener(tmp_path)
    record_event(store)
    for bad in ["../events.jsonl", "/etc/passwd", "A" * 32, "", "0" * 31, "0" * 32]:
        assert store.file_for(bad) is None


def test_retention_deletes_collected_files_first_then_only_above_hard_limit(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    records = [record_event(store, seconds=1.0) for _ in range(6)]
    size_mb = records[0].file.size_bytes / 1024 / 1024  # type: ignore[union-attr]
    for collected in records[3:5]:
        store.mark_collected(collected.event_id)
    # Soft limit of ~3 files: the two collected go first, even though they are newer.
    store.storage = store.storage.model_copy(
        update={"max_disk_mb": 3.5 * size_mb, "hard_max_disk_mb": 10 * size_mb, "min_free_mb": 0}
    )
    report = store.enforce_retention()
    assert report.deleted_collected == 2
    assert report.deleted_uncollected == 0
    remaining = {r.event_id for r in records if store.file_for(r.event_id)}
    assert remaining == {r.event_id for r in records[:3] + records[5:]}
    # Below the hard limit, uncollected files are never deleted.
    assert store.enforce_retention().deleted_uncollected == 0
    # Above the hard limit, the oldest uncollected go.
    store.storage = store.storage.model_copy(update={"hard_max_disk_mb": 2.5 * size_mb})
    report = store.enforce_retention()
    assert report.deleted_uncollected == 2
    assert store.file_for(records[0].event_id) is None
    assert store.file_for(records[5].event_id) is not None


def test_records_in_memory_are_small_and_the_log_is_never_read_whole(
    tmp_path: Path, store_opener: Opener
) -> None:
    # A device keeping 10 000 event files holds 10 000 records in memory for months: as
    # pydantic models they took ~3.3 kB each, now the fields the walks read and where the record
    # is in the log (~0.45 kB). What else `open` keeps (caches warmed by the first parse in a
    # process: up to ~2 MB seen in a long pytest run) is spread over the records. Replaying the
    # log line by line keeps the peak near what is held; reading it whole added its ~6 MB.
    count = 10_000
    store = store_opener(tmp_path)
    template = record_event(store)
    assert template.file is not None
    store.close()
    lines = []
    for seq in range(2, count + 2):
        onset = template.onset_time + timedelta(seconds=seq)
        name = event_file_name("testpi", onset, seq, "wav")
        record = template.model_copy(
            update={
                "seq": seq,
                "event_id": new_event_id(),
                "onset_time": onset,
                "file": template.file.model_copy(update={"name": name}),
            }
        )
        (store.directory_for(onset) / name).touch()  # on disk: kept, whatever its age
        lines.append(json.dumps({"kind": "event", "record": record.model_dump(mode="json")}))
    with (tmp_path / "events.jsonl").open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    del lines
    log_bytes = (tmp_path / "events.jsonl").stat().st_size

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reopened = store_opener(tmp_path)
        gc.collect()
        held, peak = (value - before for value in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    assert reopened.records_held == count + 1
    assert reopened.count_since(1) == count
    assert reopened.records_since(count, 1) == [record]
    assert reopened.get(record.event_id) == record
    assert held / count < 768, f"{held / count:.0f} bytes per record"
    assert peak - held < log_bytes / 4, f"peak {peak - held} bytes above what is held"


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_a_salvaged_event_keeps_the_id_its_start_message_carried(
    tmp_path: Path, store_opener: Opener, fmt: str
) -> None:
    store = store_opener(tmp_path)
    onset = datetime(2026, 11, 25, 12, 0, 9, tzinfo=UTC)
    meta = EventMeta(
        event_id=new_event_id(), seq=store.reserve_seq(), device_id=store.device_id,
        onset_time=onset, file_start_time=onset, samplerate=SAMPLERATE, channels=1,
        recording=RecordingSettings(format=fmt),  # type: ignore[arg-type]
        detector=DetectorSettings(),
    )  # fmt: skip
    writer = EventWriter(meta, store.directory_for(onset))
    writer.open()
    for _ in range(4):  # FLAC writes whole frames of 4096 samples
        writer.write(tone(0.5))
    writer._file.flush()  # what a kill -9 in the middle of the event leaves on disk
    store.close()
    reopened = store_opener(tmp_path)
    (salvaged,) = reopened.records_since(0, 10)
    assert (salvaged.event_id, salvaged.seq) == (meta.event_id, meta.seq)
    assert reopened.counters.files_salvaged == 1
    # Most of the audio is back (a FLAC encoder still held its last frame or so).
    assert salvaged.file is not None
    assert 1.5 <= salvaged.file.duration_s <= 2.0
    audio, _ = sf.read(reopened.path_of(salvaged), dtype="float32")
    assert audio.shape[0] == round(salvaged.file.duration_s * SAMPLERATE)
