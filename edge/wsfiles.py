"""Reading event files for a transfer: off the loop, one chunk ahead, inside the event directory.

The agent never holds a whole file: at most the chunk being sent and the one being read.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import IO


class ReadAhead:
    """Reads a file's chunks on a worker thread, one chunk ahead of the sender.

    The next chunk is read while the current one is being sent, so disk and socket overlap;
    the agent holds at most two chunks. Reads are sequential (one in flight at a time).
    """

    def __init__(self, handle: IO[bytes], length: int, chunk_bytes: int) -> None:
        self._handle = handle
        self._remaining = length
        self._chunk_bytes = chunk_bytes
        self._pending: asyncio.Future[bytes] | None = None
        self._expected = 0
        self._start_read()

    def _start_read(self) -> None:
        if self._remaining <= 0:
            self._pending = None
            return
        count = min(self._chunk_bytes, self._remaining)
        self._remaining -= count
        self._expected = count
        self._pending = asyncio.ensure_future(asyncio.to_thread(self._handle.read, count))

    async def next_chunk(self) -> bytes:
        """The next chunk; b"" at the end. Raises OSError if the file is shorter than said."""
        if self._pending is None:
            return b""
        # Shielded: cancelling the sender must not cancel the read on the thread, or release()
        # would close the file under it.
        chunk = await asyncio.shield(self._pending)
        if len(chunk) != self._expected:
            self._pending = None
            raise OSError(
                f"the file ended {self._remaining + self._expected - len(chunk)} bytes early"
            )
        self._start_read()
        return chunk

    def release(self) -> None:
        """Close the file now, or once a read still running on its thread has finished."""
        pending, self._pending = self._pending, None
        if pending is None or pending.done():
            if pending is not None and not pending.cancelled():
                pending.exception()  # retrieved: a failed read-ahead nobody needs is not news
            self._handle.close()
            return

        def close_after(read: asyncio.Future[bytes]) -> None:
            if not read.cancelled():
                read.exception()
            self._handle.close()

        pending.add_done_callback(close_after)


async def open_in_thread(path: Path, events_dir: Path, size: int, offset: int) -> IO[bytes]:
    """Open off the loop; if the session is cancelled meanwhile, close what the thread opened."""
    opening = asyncio.ensure_future(
        asyncio.to_thread(_open_event_file, path, events_dir, size, offset)
    )
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[IO[bytes]]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _open_event_file(path: Path, events_dir: Path, size: int, offset: int) -> IO[bytes]:
    """Open an event file at `offset`; refuse anything outside the event directory or resized.

    The store builds paths from its own log, so this is a second line of defence (a symlink
    planted in the data directory, a log edited by hand).
    """
    if not path.resolve().is_relative_to(events_dir.resolve()):
        raise OSError(f"{path} is outside {events_dir}")
    handle = path.open("rb")
    actual = os.fstat(handle.fileno()).st_size
    if actual != size:
        handle.close()
        raise OSError(f"{path.name} has {actual} bytes on disk, the event log says {size}")
    handle.seek(offset)
    return handle
