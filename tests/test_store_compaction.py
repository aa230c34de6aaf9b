"""Bounded history of the event log: compaction drops only old records whose file is gone and
whose delivery (the MQTT `end`) is durable, crash-safely, keeping `seq` monotonic across
restarts, and never on the path that writes events."""

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import soundfile as sf

from edge.agent import Agent
from edge.capture import FileSource
from edge.messages.common import EventRecord
from edge.outbox import Outbox
from edge.recorder import new_event_id
from edge.settings import AgentSettings, StorageSettings
from edge.store import COMPACT_MIN_DROPPABLE, EventStore, LogCompactor, _CompactionPlan
from edge.timeutil import utc_now
from tests import helpers
from tests.helpers import record_event

Opener = Callable[..., EventStore]

OLD = datetime(2020, 1, 1, tzinfo=UTC)  # far beyond any horizon


def open_without_mqtt(store_opener: Opener, data_dir: Path, **storage: float) -> EventStore:
    """A store as an agent with MQTT off opens it: no delivery gates compaction."""
    store = store_opener(data_dir, **storage)
    store.set_delivery_horizon(None)
    return store


def old_event(store: EventStore) -> EventRecord:
    return record_event(store, seconds=0.05, onset=OLD + timedelta(minutes=store.newest_seq + 1))


def event_without_file(store: EventStore, onset: datetime) -> EventRecord:
    template = record_event(store, seconds=0.05, onset=onset)  # a real record to copy
    seq = store.reserve_seq()
    record = template.model_copy(update={"event_id": new_event_id(), "seq": seq, "file": None})
    store.add(record, None)
    return record


def fileless_event(store: EventStore, onset: datetime = OLD) -> EventRecord:
    """An event recorded without a file, droppable once old."""
    return helpers.fileless_event(store, onset)


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
    store = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=1, event_log_keep_events=2
    )
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
    store = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=1
    )
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
        reopened = open_without_mqtt(
            store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=1
        )
        assert not store.compact_path.exists()
        assert seqs(reopened) == [r.seq for r in records]  # the whole old log
        assert reopened.compact() == 2  # compacted again, from it
        assert seqs(reopened) == [3, 4]
        assert all(reopened.file_for(r.event_id) for r in records[2:])
        reopened.close()


def test_appends_during_compaction_are_kept(tmp_path: Path, store_opener: Opener) -> None:
    store = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=1
    )
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
    # Records are read back from the log: the kept ones moved, the late one came with the tail.
    assert store.records_since(0, 10) == [records[2], records[3], late, also_late]
    assert store.get(late.event_id) == late
    store.close()

    reopened = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=10)
    assert seqs(reopened) == [3, 4, late.seq, also_late.seq]
    assert reopened.is_collected(records[2].event_id)
    assert reopened.file_for(late.event_id) is not None


def test_a_crash_between_writing_aside_and_installing_loses_nothing(
    tmp_path: Path, store_opener: Opener
) -> None:
    store = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=1
    )
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
    store = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=0
    )
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
    compact_every = 10  # events between two passes of the compactor (it runs on a timer)
    store = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=keep_events
    )
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
    for index in range(300):
        record = old_event(store)
        store.mark_collected(record.event_id)  # a controller keeps up
        store.enforce_retention()
        if index % compact_every == 0:
            store.compact(COMPACT_MIN_DROPPABLE)  # what LogCompactor does
        most_held = max(most_held, store.records_held)
    bound = keep_events + files_kept + 1 + COMPACT_MIN_DROPPABLE + compact_every
    assert most_held <= bound
    assert store.counters.records_dropped > 0
    assert store.newest_seq == 301
    store.close()
    assert len(log_lines(tmp_path)) <= 3 * bound + 1

    reopened = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=keep_events
    )
    reopened.compact()
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


def test_a_store_keeps_everything_until_told_what_was_delivered(
    tmp_path: Path, store_opener: Opener
) -> None:
    # An agent ran without MQTT; its log holds old records whose files are gone.
    store = open_without_mqtt(
        store_opener, tmp_path, event_log_keep_days=0, event_log_keep_events=0
    )
    records = [fileless_event(store) for _ in range(5)]
    store.close()
    # Now it starts with MQTT: the store opens before the outbox, which has never run, so
    # compaction must not forget what the outbox is about to send.
    store = store_opener(tmp_path, event_log_keep_days=0, event_log_keep_events=0)
    assert store.compact() == 0
    assert seqs(store) == [r.seq for r in records]
    outbox = Outbox(tmp_path / "state", store, "ws://pi:8765")
    outbox.open()
    try:
        assert store.compact() == 0  # nothing delivered yet
        items = outbox.next_items(2)
        assert [(item.stream, item.seq) for item in items] == [("end", 1), ("end", 2)]
        for item in items:
            outbox.mark_sent(item)
            outbox.ack(item)
        outbox.flush()
        assert store.compact() == 2
        assert [item.seq for item in outbox.next_items(10)] == [3, 4, 5]
    finally:
        outbox.close()


async def test_with_mqtt_off_a_cursor_left_by_an_earlier_run_does_not_hold_history(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    storage = StorageSettings(event_log_keep_days=0, event_log_keep_events=0, min_free_mb=0)
    # An earlier run with MQTT: the broker acknowledged the first 2 of many old events.
    store = EventStore(data_dir, "filepi", storage)
    store.open()
    records = [fileless_event(store) for _ in range(COMPACT_MIN_DROPPABLE + 2)]
    outbox = Outbox(data_dir / "state", store, "ws://pi:8765")
    outbox.open()
    for item in outbox.next_items(2):
        outbox.mark_sent(item)
        outbox.ack(item)
    outbox.flush()
    outbox.close()
    store.close()
    assert (data_dir / "state" / "mqtt_outbox.json").exists()  # left behind, never to advance

    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(48000, dtype=np.float32), 48000, subtype="FLOAT")
    settings = AgentSettings(
        device_id="filepi",
        data_dir=data_dir,
        mqtt={"enabled": False},
        ws={"enabled": False},
        storage=storage,
        audio={"ring_buffers": 20, "buffer_s": 1.0},
    )
    agent = Agent(settings, FileSource(silence, realtime=True, loop=True))
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(20):
            while agent.store.counters.records_dropped < len(records):
                await asyncio.sleep(0.05)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, timeout=30)
    reopened = EventStore(data_dir, "filepi", storage)
    reopened.open()
    assert seqs(reopened) == []
    assert reopened.newest_seq == records[-1].seq
    reopened.close()


class StalledCompactionStore(EventStore):
    """A real store whose compaction stalls in its long phase (writing the log aside) until
    `release` is set, as a compaction of a large log on a slow SD card would."""

    def __init__(self, data_dir: Path) -> None:
        storage = StorageSettings(event_log_keep_days=0, event_log_keep_events=0)
        super().__init__(data_dir, "testpi", storage)
        self.writing_aside = threading.Event()
        self.release = threading.Event()

    def _write_compacted(self, plan: _CompactionPlan) -> None:
        self.writing_aside.set()
        assert self.release.wait(timeout=30)
        super()._write_compacted(plan)


def test_writing_events_never_waits_for_a_compaction(tmp_path: Path) -> None:
    store = StalledCompactionStore(tmp_path)
    store.open()
    store.set_delivery_horizon(None)
    try:
        # The pipeline's writer thread records enough droppable events to make compaction pay.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-writer") as writer:
            written = writer.submit(
                lambda: [fileless_event(store) for _ in range(2 * COMPACT_MIN_DROPPABLE)]
            )
            try:
                records = written.result(timeout=30)
            finally:
                store.release.set()
        assert not store.writing_aside.is_set(), "the writer thread compacted the log"
        assert store.records_held == len(records)
    finally:
        store.close()


async def test_the_compactor_works_in_the_background_while_events_are_written(
    tmp_path: Path,
) -> None:
    store = StalledCompactionStore(tmp_path)
    store.open()
    store.set_delivery_horizon(None)
    try:
        old = [fileless_event(store) for _ in range(COMPACT_MIN_DROPPABLE)]
        stop = asyncio.Event()
        compactor = asyncio.create_task(LogCompactor(store).run(stop), name="log-compaction")
        try:
            assert await asyncio.to_thread(store.writing_aside.wait, 10)
            # The compaction is stuck writing the log aside; the writer thread goes on.
            late = await asyncio.wait_for(
                asyncio.to_thread(lambda: [fileless_event(store) for _ in range(3)]), 10
            )
        finally:
            store.release.set()
            stop.set()
            await asyncio.wait_for(compactor, 10)
        assert store.counters.records_dropped == len(old)
        assert seqs(store) == [r.seq for r in late]
    finally:
        store.release.set()
        store.close()

    reopened = EventStore(tmp_path, "testpi", StorageSettings())
    reopened.open()
    assert seqs(reopened) == [r.seq for r in late]
    assert reopened.newest_seq == late[-1].seq
    reopened.close()
