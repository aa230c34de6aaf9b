"""Event files on disk, the append-only event log, sequence numbers and retention.

Layout under `data_dir`:
- `events/<YYYY-MM-DD>/<device>_<UTC onset>_<seq>.<ext>`: the event files;
- `events.jsonl`: the event log, one JSON object per line, appended and fsynced;
- `state/seq`: the last sequence number handed out, so `seq` survives restarts.

Crash safety: a file is written under a hidden `.part` name, fsynced, its record appended to the
log, then renamed. On open, a record whose file is still `.part` is completed by the rename if the
checksum matches; `.part` files with no record are salvaged into records (the agent died while the
event was being written) so no recorded sound is dropped.

All methods are blocking (file I/O); the agent calls them through `asyncio.to_thread` or from
its writer thread. A lock makes them safe to call from several threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge.errors import StorageError
from edge.fileio import PART_SUFFIX, fsync_dir, sha256_of, write_atomically
from edge.messages.common import EVENT_ID_PATTERN, EventRecord
from edge.settings import StorageSettings
from edge.timeutil import compact_utc, iso_utc, utc_now

logger = logging.getLogger(__name__)

_EVENT_ID_RE = re.compile(EVENT_ID_PATTERN)
MB = 1024 * 1024


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


@dataclass
class _Entry:
    record: EventRecord
    collected: bool = False
    file_present: bool = True


@dataclass
class StoreCounters:
    """Counts for health: deletions are totals over the log's life, the rest since open."""

    events_recorded: int = 0
    files_deleted_collected: int = 0
    files_deleted_uncollected: int = 0
    files_salvaged: int = 0
    log_lines_skipped: int = 0
    last_retention: RetentionReport = field(default_factory=RetentionReport)


class EventStore:
    """The event log and files of one device."""

    def __init__(self, data_dir: Path, device_id: str, storage: StorageSettings) -> None:
        self.data_dir = data_dir
        self.device_id = device_id
        self.storage = storage
        self.events_dir = data_dir / "events"
        self.log_path = data_dir / "events.jsonl"
        self.seq_path = data_dir / "state" / "seq"
        self.counters = StoreCounters()
        self._entries: dict[str, _Entry] = {}
        self._by_seq: list[_Entry] = []  # in seq order (appended in order)
        self._last_seq = 0
        self._lock = threading.RLock()
        self._log_handle: Any = None

    # -- opening and recovery ------------------------------------------------------------------

    def open(self) -> None:
        """Create directories, replay the log, recover after a crash. Raises StorageError.

        Opening an open store does nothing (tests and tools may open it before the agent).
        """
        if self._log_handle is not None:
            return
        try:
            self.events_dir.mkdir(parents=True, exist_ok=True)
            self.seq_path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._replay_log()
                self._last_seq = max(self._last_seq, self._read_seq_file())
                self._log_handle = self.log_path.open("ab")
                self._recover_files()
        except OSError as exc:
            raise StorageError(f"data directory {self.data_dir} is not usable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None

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
        raw = self.log_path.read_bytes()
        good_end = 0
        for line_end, line in _lines_with_ends(raw):
            try:
                entry = json.loads(line)
                self._apply_log_entry(entry)
                good_end = line_end
            except (json.JSONDecodeError, ValidationError, KeyError, TypeError) as exc:
                if line_end >= len(raw) and not raw.endswith(b"\n"):
                    # The last line was cut by a crash in mid-append: drop it.
                    logger.warning("dropping a truncated last line of %s", self.log_path)
                else:
                    self.counters.log_lines_skipped += 1
                    logger.error("skipping a corrupt line in %s: %s", self.log_path, exc)
                    good_end = line_end
        if good_end < len(raw):
            with self.log_path.open("r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())
        if good_end and not raw[:good_end].endswith(b"\n"):
            # The last line parsed but lost its newline: end it, or the next append joins it.
            with self.log_path.open("ab") as handle:
                handle.write(b"\n")
                os.fsync(handle.fileno())

    def _apply_log_entry(self, entry: dict[str, Any]) -> None:
        kind = entry["kind"]
        if kind == "event":
            record = EventRecord.model_validate(entry["record"])
            self._index(record)
        elif kind == "collected":
            if found := self._entries.get(entry["event_id"]):
                found.collected = True
        elif kind == "deleted":
            if found := self._entries.get(entry["event_id"]):
                if found.file_present:  # totals over the log's life, for health
                    if found.collected:
                        self.counters.files_deleted_collected += 1
                    else:
                        self.counters.files_deleted_uncollected += 1
                found.file_present = False
        else:
            raise KeyError(kind)

    def _index(self, record: EventRecord) -> None:
        entry = _Entry(record)
        self._entries[record.event_id] = entry
        self._by_seq.append(entry)
        if len(self._by_seq) > 1 and self._by_seq[-2].record.seq > record.seq:
            self._by_seq.sort(key=lambda e: e.record.seq)
        self._last_seq = max(self._last_seq, record.seq)

    def _recover_files(self) -> None:
        """Finish renames cut by a crash; salvage `.part` files with no record."""
        for entry in self._by_seq:
            if not entry.file_present or entry.record.file is None:
                continue
            final = self.path_of(entry.record)
            if final.exists():
                continue
            pending = part_path(final)
            if pending.exists() and sha256_of(pending) == entry.record.file.sha256:
                pending.replace(final)
                fsync_dir(final.parent)
                logger.info("completed the interrupted rename of %s", final.name)
            else:
                entry.file_present = False
                self._append_log(
                    {
                        "kind": "deleted",
                        "event_id": entry.record.event_id,
                        "reason": "missing after restart",
                        "at": iso_utc(utc_now()),
                    }
                )
                logger.error("event file %s is missing", final.name)
        known = {self.path_of(e.record).name for e in self._by_seq if e.record.file}
        for pending in sorted(self.events_dir.glob(f"*/.*{PART_SUFFIX}")):
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
        """The highest seq of a finished event in the log (0 if none)."""
        with self._lock:
            return self._by_seq[-1].record.seq if self._by_seq else 0

    # -- adding, listing, collecting ------------------------------------------------------------

    def directory_for(self, onset: datetime) -> Path:
        return self.events_dir / onset.strftime("%Y-%m-%d")

    def path_of(self, record: EventRecord) -> Path:
        if record.file is None:
            raise StorageError(f"event {record.event_id} has no file")
        return self.directory_for(record.onset_time) / record.file.name

    def add(self, record: EventRecord, written_part: Path | None) -> None:
        """Log a finished event, then move its `.part` file to the final name."""
        with self._lock:
            self._append_log({"kind": "event", "record": record.model_dump(mode="json")})
            self._index(record)
            self.counters.events_recorded += 1
            if written_part is not None and record.file is not None:
                final = self.path_of(record)
                written_part.replace(final)
                fsync_dir(final.parent)

    def _append_log(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")).encode("utf-8") + b"\n"
        if self._log_handle is None:
            raise StorageError("the event store is not open")
        try:
            self._log_handle.write(line)
            self._log_handle.flush()
            os.fsync(self._log_handle.fileno())
        except OSError as exc:
            raise StorageError(f"cannot append to {self.log_path}: {exc}") from exc

    def get(self, event_id: str) -> EventRecord | None:
        with self._lock:
            entry = self._entries.get(event_id)
            return entry.record if entry else None

    def file_for(self, event_id: str) -> Path | None:
        """The final path of an event's file, or None if the id is invalid, unknown or gone.

        The path is built from the log's record, never from the caller's text.
        """
        if not is_valid_event_id(event_id):
            return None
        with self._lock:
            entry = self._entries.get(event_id)
            if entry is None or not entry.file_present or entry.record.file is None:
                return None
            return self.path_of(entry.record)

    def records_since(self, since_seq: int, limit: int) -> list[EventRecord]:
        """Finished events with seq > since_seq, in seq order, at most `limit`."""
        with self._lock:
            return [e.record for e in self._by_seq if e.record.seq > since_seq][:limit]

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
                entry.collected = True
                self._append_log(
                    {"kind": "collected", "event_id": event_id, "at": iso_utc(utc_now())}
                )
            return True

    def events_on(self, day: str) -> int:
        """Number of events whose onset is on `day` (YYYY-MM-DD, UTC)."""
        with self._lock:
            return sum(1 for e in self._by_seq if e.record.onset_time.strftime("%Y-%m-%d") == day)

    @property
    def uncollected_count(self) -> int:
        with self._lock:
            return sum(1 for e in self._by_seq if e.file_present and not e.collected)

    # -- retention ------------------------------------------------------------------------------

    def _files_oldest_first(self) -> Iterator[_Entry]:
        return (e for e in self._by_seq if e.file_present and e.record.file is not None)

    def enforce_retention(self, reserve_bytes: int = 0) -> RetentionReport:
        """Delete files to stay within the limits; collected files go first, oldest first.

        Uncollected files are deleted only above the hard limit or when the disk itself is
        short of `min_free_mb`: recording new sound wins over keeping the oldest.
        """
        with self._lock:
            report = RetentionReport()
            sizes = {
                e.record.event_id: (e.record.file.size_bytes if e.record.file else 0)
                for e in self._files_oldest_first()
            }
            used = sum(sizes.values()) + reserve_bytes
            free = self.disk_free_bytes()
            soft = int(self.storage.max_disk_mb * MB)
            hard = int(self.storage.hard_limit_mb * MB)
            min_free = int(self.storage.min_free_mb * MB)

            def over(limit: int) -> bool:
                return used > limit or free < min_free

            for kind, limit in (("collected", soft), ("uncollected", hard)):
                for entry in list(self._files_oldest_first()):
                    if not over(limit):
                        break
                    if (kind == "collected") != entry.collected:
                        continue
                    size = sizes[entry.record.event_id]
                    self._delete_file(entry, reason=f"retention ({kind})")
                    used -= size
                    free += size
                    if kind == "collected":
                        report.deleted_collected += 1
                        self.counters.files_deleted_collected += 1
                    else:
                        report.deleted_uncollected += 1
                        self.counters.files_deleted_uncollected += 1
            report.event_bytes = used - reserve_bytes
            report.disk_free_bytes = self.disk_free_bytes()
            self.counters.last_retention = report
            return report

    def _delete_file(self, entry: _Entry, reason: str) -> None:
        path = self.path_of(entry.record)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        entry.file_present = False
        self._append_log(
            {
                "kind": "deleted",
                "event_id": entry.record.event_id,
                "reason": reason,
                "at": iso_utc(utc_now()),
            }
        )
        level = logging.INFO if entry.collected else logging.WARNING
        logger.log(level, "deleted %s: %s", path.name, reason)

    def disk_free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.data_dir).free
        except OSError:
            return 0

    def event_bytes(self) -> int:
        with self._lock:
            return sum(
                e.record.file.size_bytes for e in self._files_oldest_first() if e.record.file
            )


def _lines_with_ends(raw: bytes) -> Iterator[tuple[int, bytes]]:
    start = 0
    while start < len(raw):
        newline = raw.find(b"\n", start)
        end = len(raw) if newline < 0 else newline + 1
        line = raw[start:end].strip()
        if line:
            yield end, line
        start = end
