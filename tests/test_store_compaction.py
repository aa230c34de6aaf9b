"""Bounded history of the event log: compaction drops only old records whose file is gone and
whose MQTT `end` was acknowledged, crash-safely, keeping `seq` monotonic across restarts."""

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge.messages.common import EventRecord
from edge.outbox import Outbox
from edge.recorder import new_event_id
from edge.store import COMPACT_CHECK_EVERY, COMPACT_MIN_DROPPABLE, EventStore
from edge.timeutil import utc_now
from tests.helpers import record_event

Opener = Callable[..., EventStore]

OLD = datetime(2020, 1, 1, tzinfo=UTC)  # far beyond any horizon


def old_event(store: EventStore) -> EventRecord:
    return record_event(store, seconds=0.05, onset=OLD + timedelta(minutes=store.newest_seq + 1))


def event_without_file(store: EventStore, onset: datetime) -> EventRecord:
    template = record_event(store, seconds=0.05, onset=onset)  # a real record to copy
    seq = store.reserve_seq()
    record = template.model_copy(update={"event_id": new_event_id(), "seq": seq, "file": None})
    store.add(record, None)
    return record


def delete_collected_files(store: EventStore, records: list[EventRecord]) -> None:
    """A controller collects `records`; retention (soft limit ~0) then deletes their files."""
    for record in records:
        assert store.mark_collected(record.event_id)
    limits = store.storage
    store.storage = limits.model_copy(
        update={"max_disk_mb": 1e-6, "hard_max_disk_mb": 1e6, "min_free_mb": 0}
    )
    store.enforce_retention()
    store.storage = limits
    assert all(store.file_for(r.event_id) is None for r in records)


def seqs(store: EventStore) -> list[int]:
    return [r.seq for r in store.records_since(0, 1 << 30)]


def log_lines(data_dir: Path) -> list[dict[str, object]]:
    text = (data_dir / "events.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_compaction_drops_only_old_records_whose_file_is_gone(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path, event_log_keep_days=1, event_log_keep_events=2)
    gone_old = old_event(store)
    present_old = old_event(store)  # uncollected: its file stays
    gone_recent = record_event(store, seconds=0.05, onset=utc_now())
    no_file_old = event_without_file(store, OLD)
    newest = [old_event(store), old_event(store)]
    delete_collected_files(store, [gone_old, gone_recent, *newest])
    deleted_before = store.counters.files_deleted_collected

    dropped = store.compact()

    # The template records that event_without_file copied are old and have files: kept.
    kept = [r.seq for r in store.records_since(0, 100)]
    assert gone_old.seq not in kept
    assert no_file_old.seq not in kept
    assert dropped == 2
    assert {present_old.seq, gone_recent.seq, *(r.seq for r in newest)} <= set(kept)
    assert kept == sorted(kept)
    assert store.get(gone_old.event_id) is None
    assert store.file_for(present_old.event_id) is not None
    assert store.newest_seq == newest[-1].seq
    assert log_lines(tmp_path)[0]["kind"] == "compacted"
    store.close()

    reopened = store_opener(tmp_path, event_log_keep_days=1, event_log_keep_events=2)
    assert seqs(reopened) == kept
    assert reopened.is_collected(newest[0].event_id)
    assert reopened.file_for(newest[0].event_id) is None
    assert reopened.counters.files_deleted_collected == deleted_before
    assert reopened.newest_seq == newest[-1].seq


def test_records_not_acknowledged_by_the_broker_are_kept(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=0)
    records = [old_event(store) for _ in range(5)]
    delete_collected_files(store, records)
    outbox = Outbox(tmp_path / "state", store, "ws://pi:8765")
    outbox.open()
    try:
        # MQTT in use and nothing acknowledged yet: everything is kept for the outbox.
        assert store.compact() == 0
        items = outbox.next_items(2)
        assert [item.seq for item in items] == [1, 2]
        for item in items:
            outbox.mark_sent(item)
            outbox.ack(item)
        assert store.compact() == 0  # acknowledged in memory only: the cursor is not durable
        outbox.flush()

        assert store.compact() == 2
        assert seqs(store) == [3, 4, 5]
        assert outbox.depth == 3
        assert [item.seq for item in outbox.next_items(10)] == [3, 4, 5]
        outbox.rewind()
        assert [item.seq for item in outbox.next_items(10)] == [3, 4, 5]
    finally:
        outbox.close()
    store.close()
    reopened = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=0)
    assert seqs(reopened) == [3, 4, 5]


def test_a_crash_before_the_rename_loses_nothing(tmp_path: Path, store_opener: Opener) -> None:
    store = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=1)
    records = [old_event(store) for _ in range(4)]
    delete_collected_files(store, records[:2])
    log = tmp_path / "events.jsonl"
    before = log.read_bytes()
    assert store.compact() == 2
    after = log.read_bytes()
    store.close()
    for leftover in (after, after[: len(after) // 2]):  # complete, or cut in mid-write
        # kill -9 after the log was written aside, before (or while) it replaced the log.
        log.write_bytes(before)
        store.compact_path.write_bytes(leftover)
        reopened = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=1)
        assert not store.compact_path.exists()
        assert seqs(reopened) == [3, 4]  # compacted again at open, from the whole old log
        assert all(reopened.file_for(r.event_id) for r in records[2:])
        reopened.close()


def test_appends_during_compaction_are_kept(tmp_path: Path, store_opener: Opener) -> None:
    store = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=1)
    records = [old_event(store) for _ in range(4)]
    delete_collected_files(store, records[:2])
    # The phases of compact(), with the store used in between as by other threads.
    plan = store._plan_compaction(1)
    assert plan is not None
    store._write_compacted(plan)
    late = old_event(store)
    assert store.mark_collected(records[2].event_id)
    store._install_compacted(plan)
    assert not store.compact_path.exists()
    assert seqs(store) == [3, 4, late.seq]
    also_late = old_event(store)  # appended to the new log
    store.close()

    reopened = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=10)
    assert seqs(reopened) == [3, 4, late.seq, also_late.seq]
    assert reopened.is_collected(records[2].event_id)
    assert reopened.file_for(late.event_id) is not None


def test_a_crash_between_writing_aside_and_installing_loses_nothing(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=1)
    records = [old_event(store) for _ in range(3)]
    delete_collected_files(store, records[:1])
    plan = store._plan_compaction(1)
    assert plan is not None
    store._write_compacted(plan)
    late = old_event(store)
    store.close()  # the process dies here: the aside file stays, never renamed

    reopened = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=10)
    assert not reopened.compact_path.exists()
    assert seqs(reopened) == [r.seq for r in records] + [late.seq]


def test_seq_stays_monotonic_after_compacting_everything(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=0)
    records = [old_event(store) for _ in range(3)]
    delete_collected_files(store, records)
    assert store.compact() == 3
    assert seqs(store) == []
    assert store.newest_seq == 3
    unused = store.reserve_seq()  # an event that started and never finished
    store.close()
    assert [line["kind"] for line in log_lines(tmp_path)] == ["compacted"]

    reopened = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=0)
    assert reopened.newest_seq == 3
    assert seqs(reopened) == []
    assert reopened.reserve_seq() == unused + 1
    reopened.close()

    # Even without state/seq, the compacted log still knows the newest seq.
    (tmp_path / "state" / "seq").unlink()
    again = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=0)
    assert again.newest_seq == 3
    later = old_event(again)
    assert later.seq > 3
    # A client asking for seqs older than the kept history gets what exists, in order.
    assert [r.seq for r in again.records_since(0, 10)] == [later.seq]
    assert [r.seq for r in again.records_since(1, 10)] == [later.seq]
    assert again.records_since(later.seq, 10) == []


def test_memory_stays_bounded_with_many_events_and_retention(
    tmp_path: Path, store_opener: Opener
) -> None:
    keep_events = 20
    store = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=keep_events)
    first = old_event(store)
    assert first.file is not None
    files_kept = 5
    store.storage = store.storage.model_copy(
        update={
            "max_disk_mb": (files_kept + 0.5) * first.file.size_bytes / 1024 / 1024,
            "hard_max_disk_mb": 1e6,
            "min_free_mb": 0,
        }
    )
    most_held = 0
    for _ in range(300):
        record = old_event(store)
        store.mark_collected(record.event_id)  # a controller keeps up
        store.enforce_retention()
        most_held = max(most_held, store.records_held)
    bound = keep_events + files_kept + 1 + COMPACT_MIN_DROPPABLE + COMPACT_CHECK_EVERY
    assert most_held <= bound
    assert store.counters.records_dropped > 0
    assert store.newest_seq == 301
    store.close()
    assert len(log_lines(tmp_path)) <= 3 * bound + 1

    reopened = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=keep_events)
    assert reopened.records_held <= keep_events + files_kept + 1
    assert seqs(reopened)[-1] == 301
    assert reopened.reserve_seq() == 302


def test_retention_totals_match_the_files_on_disk(tmp_path: Path, store_opener: Opener) -> None:
    store = store_opener(tmp_path)
    records = [record_event(store, seconds=0.2) for _ in range(6)]
    delete_collected_files(store, records[:2])
    missing = store.path_of(records[2])

    def on_disk() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "events").rglob("*.wav"))

    assert store.event_bytes() == on_disk()
    assert store.enforce_retention().event_bytes == on_disk()
    store.close()
    missing.unlink()  # gone while the agent was stopped
    reopened = store_opener(tmp_path)
    assert reopened.file_for(records[2].event_id) is None
    assert reopened.event_bytes() == on_disk()
