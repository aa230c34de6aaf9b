"""Reading event files for a transfer, inside the event directory, without holding a whole file.

Two ways to put a file's chunks on the wire, both one binary frame per chunk:

- `FileFrames` (plain ws://): each frame's header is written to the transport and its payload
  goes from the page cache to the socket with sendfile(2), without passing through Python. The
  file is read on the event loop: event files are usually still in the page cache (the agent
  wrote them moments ago), and the kernel is asked to read the next chunk ahead.
- `ReadAhead` (wss://, or when sendfile is off or unavailable): chunks are read on a worker
  thread, one ahead of the sender, and sent through websockets like any message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from pathlib import Path
from typing import IO

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

logger = logging.getLogger(__name__)


class NotTheRecordedFileError(OSError):
    """The file on disk is not the one the event log recorded (another size, ending early,
    outside the event directory): it will not come back, unlike an error from the system."""


_FIN_BINARY = 0x82  # FIN bit + opcode 2 (binary); a server's frames are not masked


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked, unfragmented binary frame (RFC 6455, 5.2)."""
    if length < 126:
        return struct.pack("!BB", _FIN_BINARY, length)
    if length < 1 << 16:
        return struct.pack("!BBH", _FIN_BINARY, 126, length)
    return struct.pack("!BBQ", _FIN_BINARY, 127, length)


class FileFrames:
    """Writes chunks of an open file as binary frames, the payload by sendfile(2).

    `write_frame` writes a whole frame in one step, without awaiting: the header into the
    transport, then the payload straight from the file into the socket. Nothing else can be
    written in between (the loop runs nothing else meanwhile), so keepalive pings, pongs and
    close frames of the websockets library only ever go between frames. If the socket takes
    only part of the payload, the rest is read and left in the transport's buffer like any
    other write, and `drain` waits for it as `send` would. When the transport still holds
    unsent data the sendfile bytes would overtake it, so `write_frame` declines and the caller
    sends the chunk the ordinary way (`read` + `send`).

    Only for plain TCP without websocket extensions (`usable`); the caller must be the only
    sender of data frames on the connection.
    """

    def __init__(self, ws: ServerConnection, handle: IO[bytes]) -> None:
        self._ws = ws
        self._file_fd = handle.fileno()
        sock = ws.transport.get_extra_info("socket")
        self._sock_fd: int = sock.fileno()
        self.bytes_zero_copy = 0  # what went by sendfile; the rest was copied

    @staticmethod
    def usable(ws: ServerConnection) -> bool:
        return (
            hasattr(os, "sendfile")
            and not ws.protocol.extensions
            and ws.transport.get_extra_info("sslcontext") is None
            and ws.transport.get_extra_info("socket") is not None
        )

    def read(self, offset: int, count: int) -> bytes:
        """The chunk itself, to send the ordinary way. Raises OSError if the file is short."""
        self._read_ahead(offset + count, count)
        return self._pread(offset, count)

    def write_frame(self, offset: int, count: int) -> bool:
        """Write bytes offset…offset+count-1 as one frame now; False (nothing written) if not
        possible at the moment. Raises OSError, before writing anything, if the file is shorter.
        """
        transport = self._ws.transport
        if (
            self._ws.protocol.state is not State.OPEN
            or transport.is_closing()
            or transport.get_write_buffer_size()
        ):
            return False
        if os.fstat(self._file_fd).st_size < offset + count:
            raise NotTheRecordedFileError(f"the file is shorter than {offset + count} bytes")
        self._read_ahead(offset + count, count)
        transport.write(binary_frame_header(count))
        try:
            sent = 0 if transport.get_write_buffer_size() else self._sendfile(offset, count)
            if sent < count:
                # The socket is full: the rest waits in the transport's buffer, behind the
                # header if even that did not go out.
                transport.write(self._pread(offset + sent, count - sent))
        except OSError as exc:
            # Half a frame is on the wire: the connection cannot be used any more. The next
            # send raises ConnectionClosed, as after any other failed write.
            logger.warning(
                "a transfer to %s broke off in a frame: %s", self._ws.remote_address, exc
            )
            transport.abort()
        return True

    def _sendfile(self, offset: int, count: int) -> int:
        """As much of the payload as the socket takes now, from the page cache."""
        sent = 0
        try:
            while sent < count:
                step = os.sendfile(self._sock_fd, self._file_fd, offset + sent, count - sent)
                if step == 0:
                    break  # the file ended early: _pread() raises
                sent += step
        except BlockingIOError:
            pass
        self.bytes_zero_copy += sent
        return sent

    async def drain(self) -> None:
        """Wait while the transport's buffer is above the connection's write limit, as `send`
        does after writing. Raises ConnectionClosed if the connection is lost meanwhile."""
        try:
            await self._ws.drain()  # what websockets' own send() awaits after writing
        except OSError as exc:
            self._ws.transport.abort()
            await self._ws.wait_closed()
            raise self._ws.protocol.close_exc from exc

    def _pread(self, offset: int, count: int) -> bytes:
        data = os.pread(self._file_fd, count, offset)
        if len(data) != count:
            raise NotTheRecordedFileError(f"the file ended {count - len(data)} bytes early")
        return data

    def _read_ahead(self, offset: int, count: int) -> None:
        """Ask the kernel to start reading the next chunk from disk while this one is sent."""
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._file_fd, offset, count, os.POSIX_FADV_WILLNEED)


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
            raise NotTheRecordedFileError(
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
        raise NotTheRecordedFileError(f"{path} is outside {events_dir}")
    handle = path.open("rb")
    actual = os.fstat(handle.fileno()).st_size
    if actual != size:
        handle.close()
        raise NotTheRecordedFileError(
            f"{path.name} has {actual} bytes on disk, the event log says {size}"
        )
    handle.seek(offset)
    return handle
