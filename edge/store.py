"""Event files on disk, the append-only event log, sequence numbers and retention.

Layout under `data_dir`:
- `events/<YYYY-MM-DD>/<device>_<UTC onset>_<seq>.<ext>`: the event files;
- `events.jsonl`: the event log, one JSON object per line, appended and fsynced;
- `state/seq`: the last sequence number handed out, so `seq` survives restarts.

Crash safety: a file is written under a hidden `.part` name, fsynced, its record appended to the
log, then renamed. On open, a record whose file is still `.part` is completed by the rename if the
checksum matches; `.part` files with no record are salvaged into records (the agent died while the
event was being written) so no recorded sound is dropped.

Bounded history: a record whose file is gone (deleted by retention, missing, or never written)
is dropped from memory and from the log once it is older than `event_log_keep_days` and not
among the newest `event_log_keep_events`, and only if its delivery is durable: whoever delivers
event messages (the MQTT outbox) hands over its durable cursor with `set_delivery_horizon`, and
records above it are kept. A store keeps everything until told, so after a restart nothing
undelivered goes before the outbox has read its cursor; `None` (MQTT off) means nothing gates.
Compaction rewrites the log aside (`.events.jsonl.compact`), fsyncs it, renames it over the log
and fsyncs the directory; a crash at any point leaves the old or the new log, both complete. Its
first line, `{"kind": "compacted", ...}`, keeps what the dropped records contributed: the newest
seq (so `seq` and `newest_seq` never go back) and the deletion totals reported in health.
`LogCompactor`, a task of the agent, runs it now and then in a worker thread, never on the
writer thread: the lock is held only to take a snapshot and to swap the files, so appending an
event waits at most for that swap, not for the log to be serialized and written.

All `EventStore` methods are blocking (file I/O); the agent calls them through
`asyncio.to_thread` or from its writer thread. A lock makes them safe to call from several
threads.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from edge.aio import sleep_unless
from edge.errors import StorageError
from edge.fileio import (
    PART_SUFFIX,
    append_line,
    fsync_dir,
    open_log,
    sha256_of,
    write_atomically,
)
from edge.messages.common import EVENT_ID_PATTERN, EventRecord
from edge.settings import StorageSettings
from edge.timeutil import compact_utc, iso_utc, utc_now

logger = logging.getLogger(__name__)

_EVENT_ID_RE = re.compile(EVENT_ID_PATTERN)
MB = 1024 * 1024

# LogCompactor compacts when at least this many records may go, and at least a quarter of the
# ones kept (so rewriting the log costs a few lines per dropped record); it looks every
# COMPACT_INTERVAL_S (a look is a walk over the records in memory, no I/O unless it compacts).
COMPACT_MIN_DROPPABLE = 64
COMPACT_INTERVAL_S = 60.0
COMPACT_SUFFIX = ".compact"


def event_file_name(device_id: str, onset: datetime, seq: int, extension: str) -> str:
    return f"{device_id}_{compact_utc(onset)}_{seq:06d}.{extension}"


def part_path(final_path: Path) -> Path:
    return final_path.with_name(f".{final_path.name}{PART_SUFFIX}")


def is_valid_event_id(event_id: object) -> bool:
    return isinstance(event_id, str) and _EVENT_ID_RE.fullmatch(event_id) is not None


@dataclass
class RetentionReport:
    """What the last retention pass did; reported in health."""

    event_bytes: int = 0
    deleted_collected: int = 0
    deleted_uncollected: int = 0
    disk_free_bytes: int = 0


@dataclass(slots=True)
class _Entry:
    """One event in memory: where its record is in the log, plus the fields read on every walk.

    Every record whose file is on disk stays in memory, for months on a device: thousands of
    them. The whole record (a pydantic model: ~2.5 kB) is read back from its log line where it
    leaves the store (~20 us); the walks over the records (seq order, retention, compaction)
    read only these fields (~0.45 kB an entry with its index slots).
    """

    seq: int
    event_id: str
    onset_time: datetime
    file_name: str | None  # None: the event has no file (lost, never written)
    size_bytes: int
    offset: int  # where its "event" line starts in the log (moved only by compaction)
    collected: bool = False
    file_present: bool = True

    @classmethod
    def of(cls, record: EventRecord, offset: int) -> _Entry:
        return cls(
            seq=record.seq,
            event_id=record.event_id,
            onset_time=record.onset_time,
            file_name=record.file.name if record.file is not None else None,
            size_bytes=record.file.size_bytes if record.file is not None else 0,
            offset=offset,
        )

    @property
    def has_file(self) -> bool:
        """A file that is (as far as the log knows) on disk."""
        return self.file_present and self.file_name is not None


@dataclass
class StoreCounters:
    """Counts for health: deletions are totals over the log's life, the rest since open."""

    events_recorded: int = 0
    files_deleted_collected: int = 0
    files_deleted_uncollected: int = 0
    files_salvaged: int = 0
    log_lines_skipped: int = 0
    records_dropped: int = 0  # by compaction, since open
    last_retention: RetentionReport = field(default_factory=RetentionReport)


@dataclass
class _Compacted:
    """What the records dropped by compaction contributed; the compacted log's first line."""

    newest_seq: int = 0
    last_seq: int = 0
    files_deleted_collected: int = 0
    files_deleted_uncollected: int = 0
    records_dropped: int = 0


@dataclass
class _CompactionPlan:
    """A snapshot taken under the lock: what to write, and where the log's tail begins."""

    keep: list[_Entry]
    kept: list[tuple[int, str, bool, bool]]  # offset, event_id, collected, file_present
    drop: list[_Entry]
    header: _Compacted
    tail_offset: int
    # Filled by _write_compacted: where each kept record's line starts in the compacted log,
    # and that log's size before the tail is appended.
    new_offsets: list[int] = field(default_factory=list)
    compacted_size: int = 0
    installed: bool = False  # renamed over the log: memory follows the compacted log


class EventStore:
    """The event log and files of one device."""

    def __init__(self, data_dir: Path, device_id: str, storage: StorageSettings) -> None:
        self.data_dir = data_dir
        self.device_id = device_id
        self.storage = storage
        self.events_dir = data_dir / "events"
        self.log_path = data_dir / "events.jsonl"
        self.seq_path = data_dir / "state" / "seq"
        self.compact_path = self.log_path.with_name(f".{self.log_path.name}{COMPACT_SUFFIX}")
        self.counters = StoreCounters()
        self._entries: dict[str, _Entry] = {}
        self._by_seq: list[_Entry] = []  # in seq order (appended in order)
        # Records appended after one with a higher seq (an event salvaged at a restart after
        # later ones were saved, ...), in log order: a deliverer that walks seqs upwards would
        # pass them by. Told by the log's own order, so it survives restarts.
        self._late: list[_Entry] = []
        self._last_seq = 0  # the last seq handed out
        self._newest_seq = 0  # the highest seq of a finished event, dropped ones included
        self._compacted = _Compacted()
        # Running totals of files on disk, so retention need not walk every record.
        self._file_bytes = 0
        self._collected_files = 0
        # Highest seq whose delivery is durable; None: nothing delivers. 0 until told: nothing
        # may go before the deliverer (which opens after the store) says what it delivered.
        self._delivery_horizon: int | None = 0
        self._lock = threading.RLock()
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._log_handle: Any = None
        # Reads records back from the log (under the lock: compaction replaces the file).
        self._reader: IO[bytes] | None = None

    # -- opening and recovery ------------------------------------------------------------------

    def open(self) -> None:
        """Create directories, replay the log, recover after a crash. Raises StorageError.

        Opening an open store does nothing (tests and tools may open it before the agent).
        """
        if self._log_handle is not None:
            return
        # Reopened after close(): the log is read again from scratch, not on top of what was.
        self._entries.clear()
        self._by_seq.clear()
        self._late.clear()
        self._newest_seq = 0
        self._compacted = _Compacted()
        self._file_bytes = self._collected_files = 0
        try:
            self.events_dir.mkdir(parents=True, exist_ok=True)
            self.seq_path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                if self.compact_path.exists():
                    # A compaction cut by a crash before its rename: the log is still whole.
                    logger.warning(
                        "removing %s left by an interrupted compaction", self.compact_path
                    )
                    self.compact_path.unlink()
                self._replay_log()
                self._last_seq = max(self._last_seq, self._read_seq_file())
                self._log_handle = open_log(self.log_path)
                self._reader = self.log_path.open("rb")
                self._recover_files()
        except OSError as exc:
            raise StorageError(f"data directory {self.data_dir} is not usable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _read_seq_file(self) -> int:
        try:
            return int(self.seq_path.read_text(encoding="ascii").strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            logger.warning(
                "ignoring unreadable %s; seq continues from the event log", self.seq_path
            )
            return 0

    def _replay_log(self) -> None:
        if not self.log_path.exists():
            return
        # Line by line: a log of thousands of records is never in memory whole.
        good_end = 0
        good_ends_line = True
        with self.log_path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            line_end = 0
            for raw_line in handle:
                offset, line_end = line_end, line_end + len(raw_line)
                line = raw_line.strip()
                if not line:
                    continue
                try:
                    self._apply_log_entry(json.loads(line), offset)
                except (
                    json.JSONDecodeError, ValidationError, KeyError, TypeError, ValueError
                ) as exc:  # fmt: skip
                    if line_end >= size and not raw_line.endswith(b"\n"):
                        # The last line was cut by a crash in mid-append: drop it.
                        logger.warning("dropping a truncated last line of %s", self.log_path)
                        continue
                    self.counters.log_lines_skipped += 1
                    logger.error("skipping a corrupt line in %s: %s", self.log_path, exc)
                good_end = line_end
                good_ends_line = raw_line.endswith(b"\n")
        if good_end < size:
            with self.log_path.open("r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())
        if not good_ends_line:
            # The last line parsed but lost its newline: end it, or the next append joins it.
            with self.log_path.open("ab") as handle:
                handle.write(b"\n")
                os.fsync(handle.fileno())

    def _apply_log_entry(self, entry: dict[str, Any], offset: int) -> None:
        kind = entry["kind"]
        if kind == "event":
            self._index(EventRecord.model_validate(entry["record"]), offset)
        elif kind == "collected":
            if found := self._entries.get(entry["event_id"]):
                self._set_collected(found)
        elif kind == "deleted":
            if found := self._entries.get(entry["event_id"]):
                if found.file_present:  # totals over the log's life, for health
                    if found.collected:
                        self.counters.files_deleted_collected += 1
                    else:
                        self.counters.files_deleted_uncollected += 1
                self._set_file_gone(found)
        elif kind == "compacted":
            compacted = _Compacted(
                **{f.name: int(entry[f.name]) for f in dataclasses.fields(_Compacted)}
            )
            self._compacted = compacted
            self._newest_seq = max(self._newest_seq, compacted.newest_seq)
            self._last_seq = max(self._last_seq, compacted.last_seq, compacted.newest_seq)
            self.counters.files_deleted_collected += compacted.files_deleted_collected
            self.counters.files_deleted_uncollected += compacted.files_deleted_uncollected
        else:
            raise KeyError(kind)

    def _index(self, record: EventRecord, offset: int) -> None:
        entry = _Entry.of(record, offset)
        self._entries[entry.event_id] = entry
        self._by_seq.append(entry)
        if len(self._by_seq) > 1 and self._by_seq[-2].seq > entry.seq:
            self._by_seq.sort(key=lambda e: e.seq)
            self._late.append(entry)
        if entry.has_file:
            self._file_bytes += entry.size_bytes
        self._last_seq = max(self._last_seq, entry.seq)
        self._newest_seq = max(self._newest_seq, entry.seq)

    def _set_collected(self, entry: _Entry) -> None:
        if not entry.collected and entry.has_file:
            self._collected_files += 1
        entry.collected = True

    def _set_file_gone(self, entry: _Entry) -> None:
        if entry.has_file:
            self._file_bytes -= entry.size_bytes
            if entry.collected:
                self._collected_files -= 1
        entry.file_present = False

    def _recover_files(self) -> None:
        """Finish renames cut by a crash; salvage `.part` files with no record."""
        for entry in self._by_seq:
            if not entry.has_file:
                continue
            final = self._path_of_entry(entry)
            if final.exists():
                continue
            pending = part_path(final)
            file = self._record_of(entry).file
            if file is not None and pending.exists() and sha256_of(pending) == file.sha256:
                pending.replace(final)
                fsync_dir(final.parent)
                logger.info("completed the interrupted rename of %s", final.name)
            else:
                self._set_file_gone(entry)
                self._append_log(
                    {
                        "kind": "deleted",
                        "event_id": entry.event_id,
                        "reason": "missing after restart",
                        "at": iso_utc(utc_now()),
                    }
                )
                logger.error("event file %s is missing", final.name)
        pending_files = _part_files(self.events_dir)
        if not pending_files:
            return
        known = {e.file_name for e in self._by_seq if e.file_name is not None}
        for pending in pending_files:
            final_name = pending.name[1 : -len(PART_SUFFIX)]
            if final_name in known:
                continue
            self._salvage(pending)

    def _salvage(self, pending: Path) -> None:
        # Imported here: salvage needs the recorder's file reader, and the recorder needs the
        # store; the cycle is broken at the one place that needs both.
        from edge.recorder import salvage_partial_file  # noqa: PLC0415

        try:
            record = salvage_partial_file(pending, self.device_id)
        except Exception as exc:  # a broken partial file must not stop the agent
            logger.error("could not salvage %s (%s); moving it aside", pending.name, exc)
            pending.rename(pending.with_name(pending.name + ".broken"))
            return
        if record is None:
            pending.unlink()
            return
        self.counters.files_salvaged += 1
        self.add(record, pending)
        logger.warning(
            "salvaged %s left by an interrupted recording", record.file and record.file.name
        )

    # -- sequence numbers ----------------------------------------------------------------------

    def reserve_seq(self) -> int:
        """The next sequence number, made durable before it is used."""
        with self._lock:
            self._last_seq += 1
            write_atomically(self.seq_path, f"{self._last_seq}\n".encode("ascii"))
            return self._last_seq

    @property
    def newest_seq(self) -> int:
        """The highest seq of a finished event (0 if none), even if compaction dropped it."""
        with self._lock:
            return self._newest_seq

    # -- adding, listing, collecting ------------------------------------------------------------

    def directory_for(self, onset: datetime) -> Path:
        return self.events_dir / onset.strftime("%Y-%m-%d")

    def path_of(self, record: EventRecord) -> Path:
        if record.file is None:
            raise StorageError(f"event {record.event_id} has no file")
        return self.directory_for(record.onset_time) / record.file.name

    def _path_of_entry(self, entry: _Entry) -> Path:
        """`path_of(entry.record())` without rebuilding the record."""
        if entry.file_name is None:
            raise StorageError(f"event {entry.event_id} has no file")
        return self.directory_for(entry.onset_time) / entry.file_name

    def add(self, record: EventRecord, written_part: Path | None) -> None:
        """Log a finished event, then move its `.part` file to the final name."""
        with self._lock:
            offset = self._append_log({"kind": "event", "record": record.model_dump(mode="json")})
            self._index(record, offset)
            self.counters.events_recorded += 1
            if written_part is not None and record.file is not None:
                final = self.path_of(record)
                written_part.replace(final)
                fsync_dir(final.parent)

    def _append_log(self, entry: dict[str, Any]) -> int:
        """Append a line to the log and fsync it; the offset where it starts."""
        line = _log_line(entry)
        if self._log_handle is None:
            raise StorageError("the event store is not open")
        try:
            return append_line(self._log_handle, line)
        except OSError as exc:
            raise StorageError(f"cannot append to {self.log_path}: {exc}") from exc

    def _event_line(self, entry: _Entry) -> bytes:
        """The log line of an entry's record (under the lock: compaction moves lines).

        A closed store still lists what it held (tools and tests read it after the agent).
        """
        try:
            if self._reader is None:
                with self.log_path.open("rb") as reader:
                    reader.seek(entry.offset)
                    return reader.readline()
            self._reader.seek(entry.offset)
            return self._reader.readline()
        except OSError as exc:
            raise StorageError(f"cannot read {self.log_path}: {exc}") from exc

    def _record_of(self, entry: _Entry) -> EventRecord:
        return self._checked_record(entry.event_id, entry.offset, self._event_line(entry))

    def _checked_record(self, event_id: str, offset: int, line: bytes) -> EventRecord:
        """The record parsed from its line, which must be the event's: a wrong offset is a
        StorageError, never another event's record (nor a crash of the reader)."""
        try:
            record = _parse_event_line(line)
        except (ValueError, KeyError, TypeError) as exc:  # ValidationError is a ValueError
            raise StorageError(
                f"{self.log_path}: the record of event {event_id} at byte {offset} is "
                f"unreadable: {exc}"
            ) from exc
        if record.event_id != event_id:
            raise StorageError(
                f"{self.log_path}: byte {offset} holds event {record.event_id}, not {event_id}"
            )
        return record

    def get(self, event_id: str) -> EventRecord | None:
        with self._lock:
            entry = self._entries.get(event_id)
            if entry is None:
                return None
            offset, line = entry.offset, self._event_line(entry)
        return self._checked_record(event_id, offset, line)

    def file_for(self, event_id: str) -> Path | None:
        """The final path of an event's file, or None if the id is invalid, unknown or gone.

        The path is built from the log's record, never from the caller's text.
        """
        if not is_valid_event_id(event_id):
            return None
        with self._lock:
            entry = self._entries.get(event_id)
            if entry is None or not entry.has_file:
                return None
            return self._path_of_entry(entry)

    def records_since(self, since_seq: int, limit: int) -> list[EventRecord]:
        """Finished events with seq > since_seq, in seq order, at most `limit`.

        Records dropped by compaction are not listed: asking for older seqs gives what is kept.
        """
        with self._lock:
            first = bisect.bisect_right(self._by_seq, since_seq, key=lambda e: e.seq)
            page = [
                (e.event_id, e.offset, self._event_line(e))
                for e in self._by_seq[first : first + max(limit, 0)]
            ]
        # Parsed outside the lock: a page may be long.
        return [self._checked_record(*item) for item in page]

    def late_records(self) -> list[EventRecord]:
        """The records appended after one with a higher seq, in the order they were added."""
        with self._lock:
            page = [(e.event_id, e.offset, self._event_line(e)) for e in self._late]
        return [self._checked_record(*item) for item in page]

    @property
    def late_count(self) -> int:
        """Changes whenever a late record comes (or compaction drops one)."""
        with self._lock:
            return len(self._late)

    def count_since(self, since_seq: int) -> int:
        """How many records `records_since(since_seq, <no limit>)` would list, without them."""
        with self._lock:
            return len(self._by_seq) - bisect.bisect_right(
                self._by_seq, since_seq, key=lambda e: e.seq
            )

    def is_collected(self, event_id: str) -> bool:
        with self._lock:
            entry = self._entries.get(event_id)
            return entry is not None and entry.collected

    def mark_collected(self, event_id: str) -> bool:
        """Remember that a controller has a verified copy; False if the id is unknown."""
        with self._lock:
            entry = self._entries.get(event_id)
            if entry is None:
                return False
            if not entry.collected:
                self._set_collected(entry)
                self._append_log(
                    {"kind": "collected", "event_id": event_id, "at": iso_utc(utc_now())}
                )
            return True

    def events_on(self, day: str) -> int:
        """Number of kept events whose onset is on `day` (YYYY-MM-DD, UTC)."""
        with self._lock:
            return sum(1 for e in self._by_seq if e.onset_time.strftime("%Y-%m-%d") == day)

    @property
    def uncollected_count(self) -> int:
        with self._lock:
            return sum(1 for e in self._by_seq if e.file_present and not e.collected)

    @property
    def records_held(self) -> int:
        """Records kept in memory (and in the log)."""
        with self._lock:
            return len(self._by_seq)

    # -- retention ------------------------------------------------------------------------------

    def enforce_retention(self, reserve_bytes: int = 0) -> RetentionReport:
        """Delete files to stay within the limits; collected files go first, oldest first.

        Uncollected files are deleted only above the hard limit or when the disk itself is
        short of `min_free_mb`: recording new sound wins over keeping the oldest. Within the
        limits this costs a disk-usage call, not a walk over the records.
        """
        with self._lock:
            report = RetentionReport()
            used = self._file_bytes + reserve_bytes
            # Unknown (the disk-usage call failed): the size limits still hold, but no
            # uncollected file goes for a free-space figure nobody measured.
            free = self._free_bytes()
            soft = int(self.storage.max_disk_mb * MB)
            hard = int(self.storage.hard_limit_mb * MB)
            min_free = int(self.storage.min_free_mb * MB)

            def over(limit: int) -> bool:
                return used > limit or (free is not None and free < min_free)

            for kind, limit in (("collected", soft), ("uncollected", hard)):
                if not over(limit) or (kind == "collected" and self._collected_files == 0):
                    continue
                for entry in self._by_seq:  # oldest first; deleting only changes the entry
                    if not over(limit):
                        break
                    if not entry.has_file or (kind == "collected") != entry.collected:
                        continue
                    size = entry.size_bytes
                    self._delete_file(entry, reason=f"retention ({kind})")
                    used -= size
                    free = None if free is None else free + size
                    if kind == "collected":
                        report.deleted_collected += 1
                        self.counters.files_deleted_collected += 1
                    else:
                        report.deleted_uncollected += 1
                        self.counters.files_deleted_uncollected += 1
            report.event_bytes = self._file_bytes
            report.disk_free_bytes = self.disk_free_bytes()
            self.counters.last_retention = report
            return report

    def _delete_file(self, entry: _Entry, reason: str) -> None:
        path = self._path_of_entry(entry)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._set_file_gone(entry)
        self._append_log(
            {
                "kind": "deleted",
                "event_id": entry.event_id,
                "reason": reason,
                "at": iso_utc(utc_now()),
            }
        )
        level = logging.INFO if entry.collected else logging.WARNING
        logger.log(level, "deleted %s: %s", path.name, reason)

    def disk_free_bytes(self) -> int:
        """Free bytes on the data disk; 0 when that cannot be told (as `health` reports it)."""
        free = self._free_bytes()
        return 0 if free is None else free

    def _free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.data_dir).free
        except OSError as exc:
            logger.warning("cannot tell the free space of %s: %s", self.data_dir, exc)
            return None

    def event_bytes(self) -> int:
        with self._lock:
            return self._file_bytes

    # -- compaction -----------------------------------------------------------------------------

    def set_delivery_horizon(self, seq: int | None) -> None:
        """Records above `seq` are kept for the deliverer; None: nothing delivers events.

        The deliverer passes only what is durable (its cursor as read or written on disk), so
        a crash can never leave a record dropped whose delivery was not recorded.
        """
        with self._lock:
            self._delivery_horizon = seq

    def compact(self, min_droppable: int = 1) -> int:
        """Drop old records whose file is gone, from memory and the log; the number dropped.

        Does nothing unless at least `min_droppable` records (and a quarter of those kept,
        when called with more than 1) may go, or while another thread compacts. The lock is
        held only to take a snapshot and to swap the files, not while the log is written.
        Failures are logged: the old log stays in place and nothing is lost.
        """
        if not self._compact_lock.acquire(blocking=False):
            return 0
        try:
            plan = self._plan_compaction(min_droppable)
            if plan is None:
                return 0
            try:
                self._write_compacted(plan)
                self._install_compacted(plan)
            except (OSError, StorageError) as exc:
                if plan.installed:
                    logger.error("compacted %s, but then: %s", self.log_path, exc)
                    return len(plan.drop)
                logger.error("could not compact %s (kept as it is): %s", self.log_path, exc)
                with contextlib.suppress(OSError):
                    self.compact_path.unlink()
                return 0
            return len(plan.drop)
        finally:
            self._compact_lock.release()

    def _plan_compaction(self, min_droppable: int) -> _CompactionPlan | None:
        horizon = utc_now() - timedelta(days=self.storage.event_log_keep_days)
        with self._lock:
            if self._log_handle is None:
                return None
            delivered = self._delivery_horizon
            protected_from = len(self._by_seq) - self.storage.event_log_keep_events
            keep: list[_Entry] = []
            drop: list[_Entry] = []
            for index, entry in enumerate(self._by_seq):
                droppable = (
                    index < protected_from
                    and not entry.has_file
                    and entry.onset_time < horizon
                    and (delivered is None or entry.seq <= delivered)
                )
                (drop if droppable else keep).append(entry)
            # Written in their log order, not in seq order: which records came late is told
            # by that order (`late_records`).
            keep.sort(key=lambda e: e.offset)
            wanted = min_droppable if min_droppable <= 1 else max(min_droppable, len(keep) // 4)
            if not drop or len(drop) < wanted:
                return None
            gone_collected = sum(1 for e in drop if e.file_name is not None and e.collected)
            gone_uncollected = sum(1 for e in drop if e.file_name is not None and not e.collected)
            header = _Compacted(
                newest_seq=self._newest_seq,
                last_seq=self._last_seq,
                files_deleted_collected=self._compacted.files_deleted_collected + gone_collected,
                files_deleted_uncollected=self._compacted.files_deleted_uncollected
                + gone_uncollected,
                records_dropped=self._compacted.records_dropped + len(drop),
            )
            return _CompactionPlan(
                keep=keep,
                kept=[(e.offset, e.event_id, e.collected, e.file_present) for e in keep],
                drop=drop,
                header=header,
                tail_offset=os.fstat(self._log_handle.fileno()).st_size,
            )

    def _write_compacted(self, plan: _CompactionPlan) -> None:
        """Write the kept records aside and fsync them.

        No lock: the log is only appended to until compaction (serialized by its own lock)
        replaces it, so the snapshot's lines stay where they are.
        """
        at = iso_utc(utc_now())
        with self.compact_path.open("wb") as handle, self.log_path.open("rb") as old:
            header = {"kind": "compacted", "at": at, **dataclasses.asdict(plan.header)}
            handle.write(_log_line(header))
            for offset, event_id, collected, file_present in plan.kept:
                # The record's line as the old log holds it, byte for byte.
                old.seek(offset)
                plan.new_offsets.append(handle.tell())
                handle.write(old.readline().strip() + b"\n")
                if collected:
                    handle.write(_log_line({"kind": "collected", "event_id": event_id, "at": at}))
                if not file_present:
                    handle.write(
                        _log_line(
                            {
                                "kind": "deleted",
                                "event_id": event_id,
                                "reason": "before compaction",
                                "at": at,
                            }
                        )
                    )
            handle.flush()
            os.fsync(handle.fileno())
            plan.compacted_size = handle.tell()

    def _install_compacted(self, plan: _CompactionPlan) -> None:
        """Append what the log got since the snapshot, rename over the log, forget the dropped."""
        with self._lock:
            if self._log_handle is None:
                raise StorageError("the event store was closed during compaction")
            with self.log_path.open("rb") as old:
                old.seek(plan.tail_offset)
                tail = old.read()
            with self.compact_path.open("ab") as handle:
                handle.write(tail)
                handle.flush()
                os.fsync(handle.fileno())
            # Closed before the rename: Windows cannot replace an open file.
            self._log_handle.close()
            if self._reader is not None:
                self._reader.close()
            try:
                self.compact_path.replace(self.log_path)
            except OSError:
                self._reopen_log()
                raise
            # From here the compacted log is the log: the offsets in memory must follow it,
            # whatever fails next.
            plan.installed = True
            self._adopt_compacted(plan)
            try:
                fsync_dir(self.log_path.parent)
            except OSError as exc:
                # Either log is whole: a power cut now may bring back the old one.
                logger.warning(
                    "could not make the compaction of %s durable: %s", self.log_path, exc
                )
            self._reopen_log()
        logger.info(
            "event log compacted: %d old records dropped, %d kept",
            len(plan.drop),
            len(plan.kept),
        )

    def _reopen_log(self) -> None:
        """Open the log's handles again (under the lock). If that fails the store stays closed:
        appends then fail with a StorageError instead of writing through a closed handle."""
        self._log_handle = self._reader = None
        try:
            self._log_handle = open_log(self.log_path)
            self._reader = self.log_path.open("rb")
        except OSError as exc:
            raise StorageError(
                f"cannot open {self.log_path} again: {exc}; no event can be recorded until the "
                "agent is restarted"
            ) from exc

    def _adopt_compacted(self, plan: _CompactionPlan) -> None:
        """Forget the dropped records and move the kept ones to their new offsets."""
        dropped = {id(e) for e in plan.drop}
        self._by_seq = [e for e in self._by_seq if id(e) not in dropped]
        self._late = [e for e in self._late if id(e) not in dropped]
        # Kept records moved to where they were written; records added since the snapshot
        # came with the tail.
        moved = {id(e): new for e, new in zip(plan.keep, plan.new_offsets, strict=True)}
        tail_shift = plan.compacted_size - plan.tail_offset
        for entry in self._by_seq:
            entry.offset = moved.get(id(entry), entry.offset + tail_shift)
        for entry in plan.drop:
            if self._entries.get(entry.event_id) is entry:
                del self._entries[entry.event_id]
        self._compacted = plan.header
        self.counters.records_dropped += len(plan.drop)


class LogCompactor:
    """The agent's task that compacts the event log, off the event path.

    Each pass runs through `asyncio.to_thread`, so the pipeline's writer thread only appends.
    On stop, a pass in progress finishes before `run` returns (the agent closes the store after
    its tasks).
    """

    def __init__(self, store: EventStore, interval_s: float = COMPACT_INTERVAL_S) -> None:
        self._store = store
        self._interval_s = interval_s

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self._store.compact, COMPACT_MIN_DROPPABLE)
            await sleep_unless(stop, self._interval_s)


def _parse_event_line(line: bytes) -> EventRecord:
    return EventRecord.model_validate(json.loads(line)["record"])


def _part_files(events_dir: Path) -> list[Path]:
    """The `.part` files in the day directories, sorted.

    Streamed with `os.scandir`: `Path.glob` lists every name of a directory first, a few MB at
    start-up on a device keeping thousands of files.
    """
    found: list[Path] = []
    with os.scandir(events_dir) as days:
        for day in days:
            if not day.is_dir():
                continue
            with os.scandir(day.path) as names:
                found.extend(
                    Path(e.path)
                    for e in names
                    if e.name.startswith(".") and e.name.endswith(PART_SUFFIX)
                )
    return sorted(found)


def _log_line(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n"
