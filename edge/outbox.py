"""The durable outbox of event messages: nothing is removed before the broker's PUBACK.

Two ordered streams, merged by `seq` when sent (start before end of the same event):
- `end` messages come from the event log itself (the store is the truth): the outbox keeps only
  a durable cursor, the highest seq whose `end` the broker acknowledged;
- `start` messages are appended to `state/mqtt_starts.jsonl` (fsynced) before they are sent,
  with their own acknowledged cursor; the file is emptied once everything in it was acknowledged.

Both cursors live in `state/mqtt_outbox.json`, written atomically; this module alone reads and
writes these files. A crash (kill -9, power loss) can only make a cursor lag, so a message may
be delivered twice, never lost: consumers deduplicate by `event_id`. The store appends
finished events in seq order (the pipeline finishes files in the order their events started)
with one exception: a record that comes after one with a higher seq (an event salvaged at a
restart after later ones were saved). The `end` cursor has passed such a record by, so the
store lists these (`EventStore.late_records`) and their `end` goes out on its own; the cursor
file keeps the late seqs whose `end` was acknowledged (`late_acked`).

The store compacts old records away only up to the `end` cursor, which the outbox hands over
(`EventStore.set_delivery_horizon`) when it opens and each time it persists it. While MQTT is
off nothing gates compaction, so after MQTT is enabled again records above the cursor may be
gone: their `end` is not sent (`records_since` lists what is kept), and neither is a pending
`start` whose event the log no longer holds, as no `end` would follow it.

Methods that touch files are blocking (call them through `asyncio.to_thread`); a lock makes the
outbox safe to use from the loop and a worker thread at once.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from edge.errors import StorageError
from edge.fileio import append_line, fsync_dir, open_log, write_atomically
from edge.messages.common import EventRecord
from edge.messages.mqtt import EventEndMessage, EventStartMessage
from edge.store import EventStore

logger = logging.getLogger(__name__)

MQTT_CURSOR_FILE = "mqtt_outbox.json"
MQTT_STARTS_FILE = "mqtt_starts.jsonl"

StreamName = Literal["start", "end"]
FETCH_BATCH = 256  # `end` records read from the event log at a time
_ORDER: dict[StreamName, int] = {"start": 0, "end": 1}


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One event message waiting for a PUBACK."""

    stream: StreamName
    seq: int
    payload: bytes

    @property
    def order(self) -> tuple[int, int]:
        return (self.seq, _ORDER[self.stream])


class _Stream:
    """Acknowledgement bookkeeping of one ordered stream (in memory; the cursor is persisted)."""

    def __init__(self, acked: int) -> None:
        self.acked = acked  # highest seq acknowledged with every earlier one
        self.sent = acked  # highest seq handed to the broker in this session
        self._in_flight: deque[int] = deque()
        self._acked_early: set[int] = set()

    def mark_sent(self, seq: int) -> None:
        self._in_flight.append(seq)
        self.sent = max(self.sent, seq)

    def ack(self, seq: int) -> None:
        self._acked_early.add(seq)
        while self._in_flight and self._in_flight[0] in self._acked_early:
            done = self._in_flight.popleft()
            self._acked_early.discard(done)
            self.acked = max(self.acked, done)

    def rewind(self) -> None:
        """The connection dropped: everything not acknowledged will be sent again."""
        self._in_flight.clear()
        self._acked_early.clear()
        self.sent = self.acked

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)


class Outbox:
    """Event messages of one device, delivered in order, at least once."""

    def __init__(self, state_dir: Path, store: EventStore, ws_url: str) -> None:
        self.store = store
        self.ws_url = ws_url
        self.cursor_path = state_dir / MQTT_CURSOR_FILE
        self.starts_path = state_dir / MQTT_STARTS_FILE
        self._lock = threading.RLock()
        self._starts: deque[EventStartMessage] = deque()  # unacknowledged, in seq order
        # `end` records fetched from the store but not sent yet: the store's records_since
        # scans the whole log, so it is called once per batch, not once per message.
        self._ends: deque[EventRecord] = deque()
        self._ends_fetched = 0  # highest seq in (or already taken from) the buffer
        self._streams: dict[StreamName, _Stream] = {"start": _Stream(0), "end": _Stream(0)}
        self._persisted: dict[StreamName, int] = {"start": 0, "end": 0}
        self._starts_handle: Any = None
        # Late records (see the module's docstring): what the store lists, which of their
        # `end`s were acknowledged (persisted), and which are in `_ends` now.
        self._late: dict[int, EventRecord] = {}
        self._late_seen = -1  # the store's late_count when `_late` was read
        self._late_acked: set[int] = set()
        self._late_queued: set[int] = set()
        self._persisted_late: frozenset[int] = frozenset()

    # -- opening ----------------------------------------------------------------------------

    def open(self) -> None:
        """Read the cursors and the pending start messages, tell the store what was delivered.

        Raises StorageError.
        """
        try:
            self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                cursors, late_acked = self._read_cursors()
                self._streams = {name: _Stream(cursors[name]) for name in ("start", "end")}
                self._persisted = dict(cursors)
                self._late_acked = set(late_acked)
                self._persisted_late = frozenset(late_acked)
                self._late_seen = -1
                self._late_queued.clear()
                self._starts = deque(
                    s
                    for s in self._read_starts()
                    if s.seq > cursors["start"] and self._end_may_follow(s.seq)
                )
                self._ends.clear()
                self._ends_fetched = cursors["end"]
                created = not self.starts_path.exists()
                self._starts_handle = open_log(self.starts_path)
                if created:  # the new file's directory entry must survive a power cut too
                    fsync_dir(self.starts_path.parent)
        except OSError as exc:
            raise StorageError(f"MQTT outbox in {self.cursor_path.parent}: {exc}") from exc
        with self._lock:
            self._read_late()
            self.store.set_delivery_horizon(self._horizon(cursors["end"]))
        if self.depth:
            logger.info("MQTT outbox holds %d event messages to deliver", self.depth)

    def close(self) -> None:
        with self._lock:
            if self._starts_handle is not None:
                self._starts_handle.close()
                self._starts_handle = None

    def _read_cursors(self) -> tuple[dict[StreamName, int], list[int]]:
        """The acknowledged cursors, and the late seqs whose `end` was acknowledged."""
        try:
            raw = json.loads(self.cursor_path.read_text(encoding="utf-8"))
            cursors: dict[StreamName, int] = {"start": int(raw["start"]), "end": int(raw["end"])}
            return cursors, [int(seq) for seq in raw.get("late_acked", [])]
        except FileNotFoundError:
            return {"start": 0, "end": 0}, []
        except (ValueError, KeyError, TypeError) as exc:
            # Losing the cursor must not lose events: start over and let consumers dedupe.
            logger.error("unreadable %s (%s): resending every event", self.cursor_path, exc)
            return {"start": 0, "end": 0}, []

    def _read_late(self) -> None:
        """Take the store's late records again if it has new ones (under the lock)."""
        count = self.store.late_count
        if count != self._late_seen:
            self._late = {r.seq: r for r in self.store.late_records()}
            self._late_seen = count

    def _late_pending(self, up_to: int) -> list[int]:
        """Late seqs up to `up_to` whose `end` is not acknowledged (the cursor passed them)."""
        return sorted(s for s in self._late if s <= up_to and s not in self._late_acked)

    def _horizon(self, end_cursor: int) -> int:
        """What the store may forget: up to the cursor, but no late record still to send."""
        pending = self._late_pending(end_cursor)
        return min(end_cursor, pending[0] - 1) if pending else end_cursor

    def _end_may_follow(self, seq: int) -> bool:
        """False for an event that finished but is not in the event log: compacted away while
        MQTT was off (or never saved); its `start` would announce what nobody can fetch."""
        if seq > self.store.newest_seq:
            return True  # still being recorded, or its record is on its way
        kept = self.store.records_since(seq - 1, 1)
        return bool(kept) and kept[0].seq == seq

    def _read_starts(self) -> list[EventStartMessage]:
        try:
            raw = self.starts_path.read_bytes()
        except FileNotFoundError:
            return []
        starts = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                starts.append(EventStartMessage.model_validate_json(line))
            except ValidationError:
                # A line cut by a crash in mid-append: its event still gets its `end`.
                logger.warning("skipping an unreadable line of %s", self.starts_path)
        if raw and not raw.endswith(b"\n"):
            with self.starts_path.open("ab") as handle:
                handle.write(b"\n")
        starts.sort(key=lambda s: s.seq)
        return starts

    # -- adding and sending -------------------------------------------------------------------

    def add_start(self, message: EventStartMessage) -> None:
        """Append a start message durably (blocking: fsync). Raises StorageError."""
        line = message.model_dump_json().encode("utf-8") + b"\n"
        with self._lock:
            if self._starts_handle is None:
                raise StorageError("the MQTT outbox is not open")
            try:
                append_line(self._starts_handle, line)
            except OSError as exc:
                raise StorageError(f"cannot append to {self.starts_path}: {exc}") from exc
            self._starts.append(message)

    def next_items(self, limit: int, end_max_seq: int | None = None) -> list[OutboxItem]:
        """Up to `limit` messages not yet sent in this session, in (seq, start-before-end) order.

        `end_max_seq` holds back `end` messages of later events (whose `start` may still be on
        its way into the outbox).
        """
        with self._lock:
            start_after = self._streams["start"].sent
            starts = list(itertools.islice((s for s in self._starts if s.seq > start_after), limit))
            self._queue_late()
            if not self._ends:
                fetched = self.store.records_since(self._ends_fetched, max(limit, FETCH_BATCH))
                self._ends.extend(fetched)
                if fetched:
                    self._ends_fetched = fetched[-1].seq
            ends = list(itertools.islice(self._ends, limit))
            if end_max_seq is not None:
                ends = [r for r in ends if r.seq <= end_max_seq]
            items = [OutboxItem("start", s.seq, s.model_dump_json().encode()) for s in starts]
            items += [
                OutboxItem(
                    "end",
                    r.seq,
                    EventEndMessage.from_record(r, self.ws_url).model_dump_json().encode(),
                )
                for r in ends
            ]
            items.sort(key=lambda item: item.order)
            return items[:limit]

    def _queue_late(self) -> None:
        """Put into `_ends` the late records the fetch from the log has passed by."""
        self._read_late()
        late = [
            self._late[seq]
            for seq in self._late_pending(self._ends_fetched)
            if seq not in self._late_queued
        ]
        if late:
            self._ends = deque(sorted([*self._ends, *late], key=lambda r: r.seq))
            self._late_queued.update(r.seq for r in late)

    def mark_sent(self, item: OutboxItem) -> None:
        """`item` (from the head of `next_items`) went to the broker."""
        with self._lock:
            self._streams[item.stream].mark_sent(item.seq)
            if item.stream == "end":
                while self._ends and self._ends[0].seq <= item.seq:
                    self._ends.popleft()

    def ack(self, item: OutboxItem) -> None:
        """The broker acknowledged `item` (QoS 1 PUBACK); persisted by the next `flush`."""
        with self._lock:
            stream = self._streams[item.stream]
            stream.ack(item.seq)
            if item.stream == "end" and item.seq in self._late:
                self._late_acked.add(item.seq)
                self._late_queued.discard(item.seq)
            if item.stream == "start":
                while self._starts and self._starts[0].seq <= stream.acked:
                    self._starts.popleft()

    def rewind(self) -> None:
        """The connection dropped: send everything unacknowledged again on the next one."""
        with self._lock:
            for stream in self._streams.values():
                stream.rewind()
            self._ends.clear()
            self._ends_fetched = self._streams["end"].acked
            self._late_queued.clear()

    def flush(self) -> None:
        """Persist the acknowledged cursors; empty the start file once all of it is delivered.

        Blocking. The cursor is written before the start file is emptied, so a crash between
        the two leaves lines that `open` skips as already acknowledged.
        """
        with self._lock:
            cursors = {name: stream.acked for name, stream in self._streams.items()}
            # Only the late seqs the store still lists: the rest need no memory.
            late_acked = frozenset(self._late_acked & self._late.keys())
            if cursors == self._persisted and late_acked == self._persisted_late:
                return
            state = {
                "start": cursors["start"],
                "end": cursors["end"],
                "late_acked": sorted(late_acked),
            }
            try:
                write_atomically(self.cursor_path, json.dumps(state).encode("utf-8"))
                self._persisted = cursors
                self._persisted_late = late_acked
                # Durable now: may be forgotten.
                self.store.set_delivery_horizon(self._horizon(cursors["end"]))
                if not self._starts and self._starts_handle is not None:
                    self._starts_handle.truncate(0)
                    os.fsync(self._starts_handle.fileno())
            except OSError as exc:
                raise StorageError(f"cannot update {self.cursor_path}: {exc}") from exc

    # -- state ----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Event messages not yet acknowledged (sent or not)."""
        with self._lock:
            self._read_late()
            acked = self._streams["end"].acked
            ends = self.store.count_since(acked) + len(self._late_pending(acked))
            return len(self._starts) + ends

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(stream.in_flight for stream in self._streams.values())

    def acked_cursor(self, stream: StreamName) -> int:
        with self._lock:
            return self._streams[stream].acked
