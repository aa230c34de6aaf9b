"""Progress of downloads and catch-ups: a status line on a terminal, nothing otherwise.

When stderr is not a terminal (systemd, pipes) the collector's log lines are the whole story;
on a terminal a single bottom line shows the catch-ups and downloads in progress, and log
records are printed above it (`TerminalProgress.handler`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Protocol, TextIO


class Progress(Protocol):
    """What the collector reports as it works."""

    def download_queued(self, count: int = 1) -> None: ...

    def download_started(self) -> None: ...

    def download_finished(self, ok: bool, size_bytes: int = 0) -> None: ...

    def catch_up(self, device_id: str, done: int, total: int) -> None: ...


class NullProgress:
    """Reports nothing (not a terminal, tests)."""

    def download_queued(self, count: int = 1) -> None:
        pass

    def download_started(self) -> None:
        pass

    def download_finished(self, ok: bool, size_bytes: int = 0) -> None:
        pass

    def catch_up(self, device_id: str, done: int, total: int) -> None:
        pass


@dataclass
class _Counts:
    queued: int = 0
    active: int = 0
    archived: int = 0
    failed: int = 0
    bytes: int = 0
    batch_done: int = 0  # finished since the collector was last idle (the bar's progress)


def bar(done: int, total: int, width: int = 20) -> str:
    """`[########............] 8/20`."""
    filled = width if total <= 0 else min(width, width * done // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


class TerminalProgress:
    """A status line at the bottom of the terminal, redrawn at most `max_rate_hz` times/s."""

    def __init__(self, stream: TextIO | None = None, max_rate_hz: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self._counts = _Counts()
        self._catch_ups: dict[str, tuple[int, int]] = {}
        self._min_interval_s = 1.0 / max_rate_hz
        self._drawn_at = 0.0
        self._line = ""

    def download_queued(self, count: int = 1) -> None:
        if self._counts.queued + self._counts.active == 0:
            self._counts.batch_done = 0  # a new batch of work begins
        self._counts.queued += count
        self._redraw()

    def download_started(self) -> None:
        self._counts.queued = max(0, self._counts.queued - 1)
        self._counts.active += 1
        self._redraw()

    def download_finished(self, ok: bool, size_bytes: int = 0) -> None:
        self._counts.active = max(0, self._counts.active - 1)
        self._counts.batch_done += 1
        if ok:
            self._counts.archived += 1
            self._counts.bytes += size_bytes
        else:
            self._counts.failed += 1
        self._redraw(force=True)

    def catch_up(self, device_id: str, done: int, total: int) -> None:
        if done >= total:
            self._catch_ups.pop(device_id, None)
        else:
            self._catch_ups[device_id] = (done, total)
        self._redraw(force=True)

    def status_line(self) -> str:
        counts = self._counts
        parts = [f"catch-up {device} {bar(d, t)}" for device, (d, t) in self._catch_ups.items()]
        batch = counts.batch_done + counts.active + counts.queued
        parts.append(
            f"downloads {bar(counts.batch_done, batch)} ({counts.active} active) | "
            f"{counts.archived} archived ({counts.bytes / 1e6:.1f} MB), {counts.failed} failed"
        )
        return " | ".join(parts)

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn_at < self._min_interval_s:
            return
        self._drawn_at = now
        self._line = self.status_line()
        self.stream.write("\r\x1b[K" + self._line)
        self.stream.flush()

    @property
    def line(self) -> str:
        """The status line as last drawn."""
        return self._line

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def handler(self, inner: logging.Handler) -> logging.Handler:
        """Wrap the log handler so records print above the status line."""
        return _AboveStatusLine(self, inner)


class _AboveStatusLine(logging.Handler):
    def __init__(self, progress: TerminalProgress, inner: logging.Handler) -> None:
        super().__init__(inner.level)
        self._progress = progress
        self._inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        self._progress.clear()
        self._inner.emit(record)
        self._progress.stream.write(self._progress.line)
        self._progress.stream.flush()
