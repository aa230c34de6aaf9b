"""The event store and files when the disk fails them: a full disk in the middle of a log
append or of an event file, an error after compaction's rename, a free-space figure that cannot
be read, a day directory that cannot be made. Real files throughout; the
full disk is the kernel's own short write under RLIMIT_FSIZE (EFBIG, the same path as ENOSPC).
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import edge.store as store_module
from edge.errors import StorageError
from edge.fileio import append_line, open_log, sha256_of
from edge.messages.common import EventRecord
from edge.recorder import EventMeta, EventWriter, new_event_id
from edge.settings import DetectorSettings, RecordingSettings
from edge.store import EventStore
from tests.helpers import SAMPLERATE, fileless_event, record_event

Opener = Callable[..., EventStore]


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Files of this process cannot grow past `limit` bytes (a disk that fills up)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


ONSET = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_a_line_cut_by_a_full_disk_is_taken_back(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with open_log(path) as handle:
        assert append_line(handle, b'{"a":1}\n') == 0
        with file_size_limit(12), pytest.raises(OSError) as caught:
            append_line(handle, b'{"b":"a line longer than the room left"}\n')
        assert caught.value.errno == errno.EFBIG
        assert path.read_bytes() == b'{"a":1}\n'  # not half a line
        assert append_line(handle, b'{"c":3}\n') == 8
    assert path.read_bytes() == b'{"a":1}\n{"c":3}\n'


def test_a_cut_line_that_could_not_be_taken_back_stays_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')  # a crash, or a failed truncate, left this
    with open_log(path) as handle:
        offset = append_line(handle, b'{"c":3}\n')
    data = path.read_bytes()
    assert data == b'{"a":1}\n{"b":\n{"c":3}\n'
    assert data[offset:] == b'{"c":3}\n'


def test_a_full_disk_during_an_append_loses_no_other_record(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    first = fileless_event(store, ONSET)
    size = store.log_path.stat().st_size
    with file_size_limit(size + 100), pytest.raises(StorageError, match="cannot append"):
        fileless_event(store, ONSET)  # its line is longer than 100 bytes: cut by the full disk
    assert store.log_path.stat().st_size == size
    # Space is back (retention freed some): the next events are recorded and read back.
    later = [fileless_event(store, ONSET) for _ in range(2)]
    wanted = [first.event_id] + [r.event_id for r in later]
    assert [r.event_id for r in store.records_since(0, 10)] == wanted
    assert store.get(later[0].event_id) == later[0]
    store.close()
    reopened = store_opener(tmp_path)
    assert [r.event_id for r in reopened.records_since(0, 10)] == wanted
    assert reopened.counters.log_lines_skipped == 0


def test_a_record_read_from_the_wrong_place_is_a_storage_error(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    first, second = fileless_event(store, ONSET), fileless_event(store, ONSET)
    store._entries[second.event_id].offset = store._entries[first.event_id].offset
    with pytest.raises(StorageError, match=f"holds event {first.event_id}, not {second.event_id}"):
        store.get(second.event_id)
    store._entries[second.event_id].offset += 3  # the middle of a line
    with pytest.raises(StorageError, match="unreadable"):
        store.records_since(0, 10)


def test_an_error_after_compactions_rename_keeps_memory_on_the_new_log(
    tmp_path: Path, store_opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_opener(tmp_path, event_log_keep_days=1, event_log_keep_events=0)
    store.set_delivery_horizon(None)
    for _ in range(5):
        fileless_event(store, datetime(2020, 1, 1, tzinfo=UTC))  # old enough to be dropped
    kept = [fileless_event(store, datetime(2099, 1, 1, tzinfo=UTC)) for _ in range(3)]

    def failing_fsync_dir(directory: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module, "fsync_dir", failing_fsync_dir)
    assert store.compact() == 5  # renamed: done, though the rename may not be durable
    monkeypatch.undo()
    assert [r.event_id for r in store.records_since(0, 10)] == [r.event_id for r in kept]
    assert store.get(kept[0].event_id) == kept[0]
    newest = fileless_event(store, ONSET)
    assert store.get(newest.event_id) == newest


def test_a_free_space_that_cannot_be_read_deletes_no_uncollected_file(
    tmp_path: Path, store_opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_opener(tmp_path, max_disk_mb=100, min_free_mb=1)
    records = [record_event(store) for _ in range(3)]

    def failing_disk_usage(path: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module.shutil, "disk_usage", failing_disk_usage)
    report = store.enforce_retention()
    assert report.deleted_uncollected == 0
    assert all(store.file_for(r.event_id) is not None for r in records)
    assert store.disk_free_bytes() == 0  # health says "unknown" the only way its schema can


def test_a_store_opened_again_after_close_lists_each_record_once(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    records = [record_event(store) for _ in range(2)]
    bytes_before = store.event_bytes()
    store.close()
    store.open()
    assert [r.event_id for r in store.records_since(0, 10)] == [r.event_id for r in records]
    assert store.event_bytes() == bytes_before
    assert os.path.getsize(store.log_path) > 0


def event_writer(store: EventStore, seq: int) -> EventWriter:
    meta = EventMeta(
        event_id=new_event_id(), seq=seq, device_id=store.device_id, onset_time=ONSET,
        file_start_time=ONSET, samplerate=SAMPLERATE, channels=1,
        recording=RecordingSettings(), detector=DetectorSettings(),
    )  # fmt: skip
    return EventWriter(meta, store.directory_for(ONSET))


def finish(writer: EventWriter) -> EventRecord:
    return writer.finish(
        offset_time=ONSET + timedelta(seconds=0.1), peak_dbfs=-6.0, noise_floor_dbfs=-60.0,
        split=False, clock_uncertain=False,
    )  # fmt: skip


def test_a_full_disk_while_an_event_is_written_ends_its_file_there_and_never_splices_it(
    tmp_path: Path, store_opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_opener(tmp_path)
    writer = event_writer(store, store.reserve_seq())
    writer.open()
    block = np.ones((1600, 1), dtype=np.float32)
    writer.write(0.25 * block)
    size = writer.part_path.stat().st_size
    with file_size_limit(size + 1000):  # room for 500 of the next 1600 frames
        writer.write(0.5 * block)
    writer.write(0.75 * block)  # room again (retention freed some): it must not follow
    record = finish(writer)
    store.add(record, writer.part_path)
    audio, _ = sf.read(store.path_of(record), dtype="float32")
    assert not np.any(np.isclose(audio, 0.75, atol=1e-3))
    assert np.allclose(audio[:1600], 0.25, atol=1e-3)
    assert 1600 < audio.size < 3200
    assert np.allclose(audio[1600:], 0.5, atol=1e-3)
    assert record.file is not None
    assert record.file.duration_s == audio.size / SAMPLERATE
    assert sha256_of(store.path_of(record)) == record.file.sha256
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "its file ends here" in errors[0].getMessage()


def test_an_event_whose_file_cannot_be_created_is_kept_without_one(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path)
    writer = event_writer(store, store.reserve_seq())
    store.directory_for(ONSET).parent.mkdir(parents=True, exist_ok=True)
    store.directory_for(ONSET).write_bytes(b"")  # a file where the day's directory goes
    with pytest.raises(StorageError, match="cannot create"):
        writer.open()
    writer.write(np.ones((1600, 1), dtype=np.float32))  # said once already: no error per block
    record = finish(writer)
    store.add(record, writer.part_path)
    assert record.file is None
    assert store.get(record.event_id) == record


def test_a_record_that_came_late_is_still_told_after_compaction_and_a_restart(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path, event_log_keep_days=1, event_log_keep_events=0)
    store.set_delivery_horizon(None)
    for _ in range(4):
        fileless_event(store, datetime(2020, 1, 1, tzinfo=UTC))  # old enough to be dropped
    late_seq = store.reserve_seq()
    fileless_event(store, datetime(2099, 1, 1, tzinfo=UTC))  # a later event is saved first
    late = fileless_event(store, datetime(2099, 1, 1, tzinfo=UTC), seq=late_seq)
    assert store.late_records() == [late]
    assert store.compact() == 4
    assert store.late_records() == [late]  # the compacted log keeps the order lines came in
    store.close()
    reopened = store_opener(tmp_path, event_log_keep_days=1, event_log_keep_events=0)
    assert reopened.late_records() == [late]
