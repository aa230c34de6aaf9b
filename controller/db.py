"""The controller's SQLite database: the fleet (devices) and every event seen, with its state.

One connection, used from worker threads (`asyncio.to_thread`) under a lock; WAL mode so the
CLI (`devices`, `events`) can read while `run` writes. Every method is blocking and small.

Event states: `started` (only the `start` message was seen), `pending` (the file is to be
collected), `archived` (verified in the archive), `failed` (given up for now; the next catch-up
tries again), `no_file` / `unavailable` (the agent has no file for it: nothing to collect).
Per device, `done_seq` is the catch-up cursor: every event up to it needs nothing more.
`received_at` is when the finished event (an `end` message or a listing) reached us.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from controller.errors import ControllerError
from edge.messages.common import EventRecord
from edge.timeutil import iso_utc, utc_now

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EventState = Literal["started", "pending", "archived", "failed", "no_file", "unavailable"]
DONE_STATES: frozenset[str] = frozenset({"archived", "no_file", "unavailable"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    status TEXT,
    status_at TEXT,
    last_seen TEXT,
    ws_url TEXT,
    info TEXT,
    health TEXT,
    config TEXT,
    done_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    onset_time TEXT NOT NULL,
    record TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    path TEXT,
    acked INTEGER NOT NULL DEFAULT 0,
    archived_at TEXT,
    received_at TEXT NOT NULL
);
-- Seqs a complete listing showed the agent never finished (lost): the cursor moves over them.
CREATE TABLE IF NOT EXISTS absent_seqs (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX IF NOT EXISTS events_by_device_seq ON events (device_id, seq);
CREATE INDEX IF NOT EXISTS events_by_onset ON events (onset_time);
"""


class DatabaseError(ControllerError):
    """The database cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    status: str | None
    status_at: str | None
    last_seen: str | None
    ws_url: str | None
    info: dict[str, Any] | None
    health: dict[str, Any] | None
    config: dict[str, Any] | None
    done_seq: int


@dataclass(frozen=True, slots=True)
class EventRow:
    event_id: str
    device_id: str
    seq: int
    onset_time: str
    record: EventRecord | None
    state: str
    attempts: int
    last_error: str | None
    path: str | None
    acked: bool
    archived_at: str | None


def _loads(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


class Database:
    """The controller's state; survives restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.commit()
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open the database {self.path}: {exc}") from exc
        self._conn = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; sqlite errors become DatabaseError."""
        with self._lock:
            if self._conn is None:
                raise DatabaseError("the database is not open")
            try:
                with self._conn:
                    yield self._conn
            except sqlite3.Error as exc:
                raise DatabaseError(f"database {self.path}: {exc}") from exc

    # -- devices --------------------------------------------------------------------------------

    def _touch(self, conn: sqlite3.Connection, device_id: str, seen: datetime | None) -> None:
        conn.execute("INSERT OR IGNORE INTO devices (device_id) VALUES (?)", (device_id,))
        if seen is not None:
            conn.execute(
                "UPDATE devices SET last_seen = ? WHERE device_id = ?", (iso_utc(seen), device_id)
            )

    def set_status(self, device_id: str, status: str) -> str | None:
        """Store the device's availability; return the previous one."""
        now = utc_now()
        with self._tx() as conn:
            self._touch(conn, device_id, now)
            row = conn.execute(
                "SELECT status FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            conn.execute(
                "UPDATE devices SET status = ?, status_at = ? WHERE device_id = ?",
                (status, iso_utc(now), device_id),
            )
        previous: str | None = row[0] if row else None
        return previous

    def set_document(
        self, device_id: str, kind: Literal["info", "health", "config"], document: dict[str, Any]
    ) -> None:
        with self._tx() as conn:
            self._touch(conn, device_id, utc_now())
            # `kind` is one of three literal column names, never user input.
            conn.execute(
                f"UPDATE devices SET {kind} = ? WHERE device_id = ?",
                (json.dumps(document), device_id),
            )
            if kind == "info" and isinstance(document.get("ws_url"), str):
                conn.execute(
                    "UPDATE devices SET ws_url = ? WHERE device_id = ?",
                    (document["ws_url"], device_id),
                )

    def devices(self) -> list[DeviceRow]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT device_id, status, status_at, last_seen, ws_url, info, health, config, "
                "done_seq FROM devices ORDER BY device_id"
            ).fetchall()
        return [
            DeviceRow(r[0], r[1], r[2], r[3], r[4], _loads(r[5]), _loads(r[6]), _loads(r[7]), r[8])
            for r in rows
        ]

    def device(self, device_id: str) -> DeviceRow | None:
        return next((d for d in self.devices() if d.device_id == device_id), None)

    # -- events ---------------------------------------------------------------------------------

    def record_start(self, device_id: str, event_id: str, seq: int, onset: datetime) -> None:
        with self._tx() as conn:
            self._touch(conn, device_id, utc_now())
            conn.execute(
                "INSERT OR IGNORE INTO events (event_id, device_id, seq, onset_time, state, "
                "received_at) VALUES (?, ?, ?, ?, 'started', ?)",
                (event_id, device_id, seq, iso_utc(onset), iso_utc(utc_now())),
            )

    def record_end(self, record: EventRecord) -> EventState:
        """Store a finished event (idempotent); return its state (`pending` if new)."""
        state: EventState = "pending" if record.file is not None else "no_file"
        with self._tx() as conn:
            self._touch(conn, record.device_id, utc_now())
            conn.execute(
                "INSERT INTO events (event_id, device_id, seq, onset_time, record, state, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET record = excluded.record, "
                "received_at = excluded.received_at, "
                "state = CASE WHEN events.state = 'started' THEN excluded.state "
                "ELSE events.state END WHERE events.record IS NULL",
                (
                    record.event_id,
                    record.device_id,
                    record.seq,
                    iso_utc(record.onset_time),
                    record.model_dump_json(),
                    state,
                    iso_utc(utc_now()),
                ),
            )
            row = conn.execute(
                "SELECT state FROM events WHERE event_id = ?", (record.event_id,)
            ).fetchone()
        if state == "no_file":
            self.advance_cursor(record.device_id)
        result: EventState = row[0]
        return result

    def mark_archived(self, event_id: str, path: Path, *, acked: bool) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE events SET state = 'archived', path = ?, archived_at = ?, "
                "last_error = NULL, acked = ? WHERE event_id = ?",
                (str(path), iso_utc(utc_now()), int(acked), event_id),
            )
            row = conn.execute(
                "SELECT device_id FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
        if row is not None:
            self.advance_cursor(row[0])

    def mark_acked(self, event_id: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE events SET acked = 1 WHERE event_id = ?", (event_id,))

    def mark_attempt(self, event_id: str, error: str, state: EventState = "pending") -> int:
        """Count a failed attempt; return the attempts so far."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE events SET attempts = attempts + 1, last_error = ?, state = ? "
                "WHERE event_id = ? AND state NOT IN ('archived')",
                (error[:500], state, event_id),
            )
            row = conn.execute(
                "SELECT attempts, device_id FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
        if row is None:
            return 0
        if state in DONE_STATES:
            self.advance_cursor(row[1])
        attempts: int = row[0]
        return attempts

    def set_state(self, event_id: str, state: EventState) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE events SET state = ? WHERE event_id = ?", (state, event_id))

    def reset_attempts(self, event_id: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE events SET attempts = 0, state = 'pending' "
                "WHERE event_id = ? AND state = 'failed'",
                (event_id,),
            )

    def event(self, event_id: str) -> EventRow | None:
        rows = self._select("WHERE event_id = ?", (event_id,))
        return rows[0] if rows else None

    def events(
        self, device_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[EventRow]:
        """Events newest first, optionally of one device and with an onset at or after `since`."""
        clauses, params = [], []
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        if since is not None:
            clauses.append("onset_time >= ?")
            params.append(iso_utc(since))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._select(
            f"{where} ORDER BY onset_time DESC, seq DESC LIMIT {int(limit)}", params
        )

    def unfinished(self) -> list[EventRow]:
        """Events whose file is still to be collected (state `pending`), oldest first."""
        return self._select("WHERE state = 'pending' AND record IS NOT NULL ORDER BY seq", ())

    def unacked(self, device_id: str) -> list[EventRow]:
        return self._select(
            "WHERE device_id = ? AND state = 'archived' AND acked = 0 ORDER BY seq", (device_id,)
        )

    def _select(self, tail: str, params: Iterable[Any]) -> list[EventRow]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT event_id, device_id, seq, onset_time, record, state, attempts, "
                f"last_error, path, acked, archived_at FROM events {tail}",
                tuple(params),
            ).fetchall()
        return [
            EventRow(
                r[0],
                r[1],
                r[2],
                r[3],
                EventRecord.model_validate_json(r[4]) if r[4] else None,
                r[5],
                r[6],
                r[7],
                r[8],
                bool(r[9]),
                r[10],
            )
            for r in rows
        ]

    def count_archived_on(self, device_id: str, day: str) -> int:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM events WHERE device_id = ? AND state = 'archived' "
                "AND onset_time LIKE ?",
                (device_id, f"{day}%"),
            ).fetchone()
        count: int = row[0]
        return count

    def highest_seq(self, device_id: str) -> int:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT MAX(seq) FROM events WHERE device_id = ?", (device_id,)
            ).fetchone()
        return int(row[0] or 0)

    def highest_end_seqs(self) -> dict[str, int]:
        """The highest seq of a finished event, per device."""
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT device_id, MAX(seq) FROM events WHERE record IS NOT NULL GROUP BY device_id"
            ).fetchall()
        return {device_id: int(seq) for device_id, seq in rows}

    # -- the catch-up cursor --------------------------------------------------------------------

    def done_seq(self, device_id: str) -> int:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT done_seq FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    def advance_cursor(self, device_id: str, absent: frozenset[int] = frozenset()) -> int:
        """Move `done_seq` over every following seq that is done or that the agent does not
        have (`absent`, from a complete listing; remembered); return the new cursor."""
        with self._tx() as conn:
            self._touch(conn, device_id, None)
            conn.executemany(
                "INSERT OR IGNORE INTO absent_seqs (device_id, seq) VALUES (?, ?)",
                [(device_id, seq) for seq in sorted(absent)],
            )
            row = conn.execute(
                "SELECT done_seq FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            done = int(row[0])
            # Done events and absent seqs after the cursor, in seq order: the cursor moves
            # while they follow each other without a hole.
            following = conn.execute(
                "SELECT seq, state IN ('archived', 'no_file', 'unavailable') FROM events "
                "WHERE device_id = ?1 AND seq > ?2 "
                "UNION ALL SELECT seq, 1 FROM absent_seqs WHERE device_id = ?1 AND seq > ?2 "
                "ORDER BY seq",
                (device_id, done),
            ).fetchall()
            for seq, is_done in following:
                if seq == done:
                    continue  # an absent seq that is also an event row: the row decides
                if seq != done + 1 or not is_done:
                    break
                done = seq
            conn.execute("UPDATE devices SET done_seq = ? WHERE device_id = ?", (done, device_id))
            conn.execute(
                "DELETE FROM absent_seqs WHERE device_id = ? AND seq <= ?", (device_id, done)
            )
        return done
