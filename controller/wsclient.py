"""Client of the agent's websocket channel: handshake, listing, verified resumable downloads.

    async with AgentClient(url, token, "archive-pc", "pull") as client:
        async for record in client.list_events(since_seq=0):
            path = await client.download(record.event_id, archive_dir, record.file)
            await client.ack(record.event_id)

One reader task owns `recv`: it routes replies to the request waiting for them, writes file
chunks of the transfer in progress to disk, and queues notifications (`EventNotice`, and
`PushedFile` in push mode) for `notifications()`. A download is written to a `.part` file,
checked for size and sha256, then renamed; a later download of the same event resumes from the
bytes already in the `.part` file. The `.part` file is held under a lock (`.part.lock`, an OS
file lock that dies with the process) for the whole download: a second download of the same
event, in this process or another, fails at once with `PartFileBusyError` (retry later) instead
of writing into it too. The protocol is in `docs/websocket.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import ssl as ssl_module
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from controller.errors import (
    AgentConnectionError,
    AgentProtocolError,
    AuthenticationError,
    ControllerError,
    HandshakeError,
    RequestError,
    TransferError,
)
from edge.fileio import fsync_dir, sha256_of
from edge.messages.common import EventFile, EventRecord, FileFormat
from edge.messages.ws import (
    AUTH_SCHEME,
    PROTOCOL_VERSION,
    Acked,
    AckRequest,
    ClientConfig,
    DownloadMode,
    ErrorCode,
    ErrorMessage,
    EventNotice,
    EventsPage,
    FileEnd,
    FileStart,
    GetRequest,
    Hello,
    ListRequest,
    Welcome,
    server_message_adapter,
)

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

logger = logging.getLogger(__name__)

PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
# Received chunks are written and hashed on a worker thread in batches of about this size:
# one thread hop per batch rather than per chunk. A download holds at most about two batches.
WRITE_BATCH_BYTES = 2 * 1024 * 1024
# The agent's chunk_bytes is at most 16 MiB; a list page of 1000 records is well below that.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024 + 64 * 1024

ServerMessage = Welcome | EventsPage | FileStart | FileEnd | Acked | EventNotice | ErrorMessage


@dataclass(frozen=True, slots=True)
class PushedFile:
    """A file the agent pushed, verified and renamed into `push_dir`."""

    event_id: str
    seq: int
    path: Path
    file: EventFile


Notification = EventNotice | PushedFile


class PartFileBusyError(TransferError):
    """Another download of the same event (this process or another) holds its `.part` file;
    nothing was written. Try again later."""


class _ConnectionEnded:
    """Sentinel queued for `notifications()` when the connection is gone."""


class AgentClient:
    """One session with one agent; use as an async context manager."""

    def __init__(
        self,
        url: str,
        token: str,
        client_id: str,
        download_mode: DownloadMode = "pull",
        *,
        formats: tuple[FileFormat, ...] = ("wav", "flac"),
        push_dir: Path | None = None,
        token_in_header: bool = True,
        ssl: ssl_module.SSLContext | None = None,
        open_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        notification_queue_size: int = 1000,
    ) -> None:
        if download_mode == "push" and push_dir is None:
            raise ValueError("download_mode 'push' needs a push_dir for the pushed files")
        self.url = url
        self.client_id = client_id
        self.config = ClientConfig(download_mode=download_mode, formats=list(formats))
        self.push_dir = push_dir
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.notifications_dropped = 0
        self._token = token
        self._token_in_header = token_in_header
        self._ssl = ssl
        self._open_timeout_s = open_timeout_s
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._max_frame_bytes = max_frame_bytes
        self._ws: ClientConnection | None = None
        self._welcome: Welcome | None = None
        self._reader: asyncio.Task[None] | None = None
        self._request_ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[ServerMessage]] = {}
        self._downloads: dict[str, _Download] = {}
        self._active: _Download | None = None  # the transfer whose binary frames are arriving
        # `get`s whose caller gave up before their file_start: their transfer, if it still
        # comes, is read and dropped (the session goes on).
        self._abandoned: set[str] = set()
        self._frames_received = 0  # every frame of the session: a queued get's sign of life
        self._notifications: asyncio.Queue[Notification | _ConnectionEnded] = asyncio.Queue(
            notification_queue_size
        )
        self._closed_error: AgentConnectionError | None = None

    # -- connection -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def welcome(self) -> Welcome:
        """The agent's answer to hello: device id, capabilities, settings, newest seq."""
        if self._welcome is None:
            raise ControllerError("not connected: use 'async with AgentClient(...)'")
        return self._welcome

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._closed_error is None

    async def connect(self) -> None:
        """Open the websocket, say hello, wait for welcome. Raises a `AgentConnectionError`."""
        headers: dict[str, str] = {}
        if self._token_in_header:
            headers["Authorization"] = f"{AUTH_SCHEME} {self._token}"
        try:
            self._ws = await connect(
                self.url,
                additional_headers=headers,
                compression=None,
                max_size=self._max_frame_bytes,
                open_timeout=self._open_timeout_s,
                ping_interval=self._ping_interval_s,
                ping_timeout=self._ping_timeout_s,
                ssl=self._ssl,
                proxy=None,  # agents are on the local network; never route them via a proxy
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", errors="replace").strip()[:200]
            if status in (401, 403):
                raise AuthenticationError(f"{self.url}: refused (HTTP {status}): {body}") from exc
            raise AgentConnectionError(f"{self.url}: HTTP {status} instead of a websocket") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise AgentConnectionError(f"{self.url}: cannot connect: {exc}") from exc
        try:
            await self._handshake(self._ws)
        except BaseException:
            await self._ws.close()
            raise
        self._reader = asyncio.create_task(self._read_loop(self._ws), name=f"ws-read {self.url}")

    async def _handshake(self, ws: ClientConnection) -> None:
        hello = Hello(
            protocol=PROTOCOL_VERSION,
            client_id=self.client_id,
            token=None if self._token_in_header else self._token,
            config=self.config,
        )
        # The agent may refuse before reading hello (too many clients): its error message is
        # then already queued, so read it even if sending failed.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(hello.model_dump_json(exclude_none=True))
        try:
            async with asyncio.timeout(self._open_timeout_s):
                raw = await ws.recv()
        except TimeoutError as exc:
            raise HandshakeError(f"{self.url}: no welcome within {self._open_timeout_s} s") from exc
        except ConnectionClosed as exc:
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            code = ErrorCode(reason) if reason in set(ErrorCode) else None
            raise HandshakeError(
                f"{self.url}: closed during the handshake: {exc}",
                code=code,
                close_code=_close_code(exc),
            ) from exc
        if isinstance(raw, bytes):
            raise AgentProtocolError(f"{self.url}: expected welcome, got a binary frame")
        message = _parse(raw)
        if isinstance(message, Welcome):
            self._welcome = message
            logger.info(
                "connected to %s (%s, protocol %d, newest seq %d)",
                message.device_id,
                self.url,
                message.protocol,
                message.newest_seq,
            )
            return
        if isinstance(message, ErrorMessage):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._open_timeout_s):
                    await ws.wait_closed()
            error_class = (
                AuthenticationError if message.code == ErrorCode.UNAUTHORIZED else HandshakeError
            )
            raise error_class(
                f"{self.url}: {message.message} ({message.code.value})",
                code=message.code,
                close_code=ws.close_code,
            )
        raise AgentProtocolError(f"{self.url}: expected welcome, got {type(message).__name__}")

    async def close(self) -> None:
        """Close the session (normal closure); pending requests fail with AgentConnectionError."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    # -- requests -------------------------------------------------------------------------------

    async def list_page(self, since_seq: int = 0, page_size: int = 100) -> EventsPage:
        """One page of finished events with seq > since_seq, in seq order."""
        request = ListRequest(request_id=self._next_id(), since_seq=since_seq, page_size=page_size)
        reply = await self._request(request.request_id, request.model_dump_json())
        if not isinstance(reply, EventsPage):
            raise AgentProtocolError(f"expected events, got {type(reply).__name__}")
        return reply

    async def list_events(
        self, since_seq: int = 0, page_size: int = 100
    ) -> AsyncIterator[EventRecord]:
        """Every finished event with seq > since_seq, page by page, in seq order."""
        while True:
            page = await self.list_page(since_seq, page_size)
            for record in page.events:
                yield record
            if not page.more or not page.events:
                return
            since_seq = page.events[-1].seq

    async def ack(self, event_id: str) -> None:
        """Tell the agent we hold a verified copy; its retention may then delete the file."""
        request = AckRequest(request_id=self._next_id(), event_id=event_id)
        reply = await self._request(request.request_id, request.model_dump_json())
        if not isinstance(reply, Acked):
            raise AgentProtocolError(f"expected acked, got {type(reply).__name__}")

    async def download(self, event_id: str, dest: Path, expected: EventFile | None = None) -> Path:
        """Fetch an event's file into `dest`; return the path of the verified file.

        `dest` is an existing directory (the file keeps the agent's name) or the file's path.

        Resumes from a `.part` file left by an interrupted download, checks size and sha256
        (against `expected` too, if given) and renames atomically. Raises `TransferError` on a
        mismatch (the `.part` file is then removed), `PartFileBusyError` if another download of
        the event holds the `.part` file, `RequestError` if the agent refuses.

        The idle timeout counts from the transfer's own `file_start`; while the `get` waits
        behind other transfers, any frame of the session shows the agent is working on it.
        """
        target = _Target(dest, event_id, expected)
        part = await asyncio.to_thread(_PartFile.acquire, target)
        try:
            if expected is not None and await asyncio.to_thread(_already_there, target, expected):
                await asyncio.to_thread(part.discard)  # a leftover of an earlier download
                return target.final_path(expected.name)
            for attempt in range(2):
                offset = await asyncio.to_thread(part.size)
                try:
                    return await self._download_once(event_id, target, part, offset)
                except RequestError as exc:
                    if exc.code != ErrorCode.INVALID_OFFSET or attempt:
                        raise
                    # The partial file is longer than the agent's file: not a prefix of it.
                    logger.warning("discarding %s: longer than the file", target.part_path.name)
                    await asyncio.to_thread(part.truncate)
            raise AssertionError("unreachable")
        finally:
            # Shielded: a cancelled caller still gives the lock up (the .part file stays).
            await asyncio.shield(asyncio.to_thread(part.release))

    async def _download_once(
        self, event_id: str, target: _Target, part: _PartFile, offset: int
    ) -> Path:
        ws = self._require_ws()
        request = GetRequest(request_id=self._next_id(), event_id=event_id, offset=offset)
        download = _Download(target, offset, pushed=False, part=part)
        self._downloads[request.request_id] = download
        try:
            if offset:
                logger.info("resuming %s from byte %d", event_id, offset)
            await ws.send(request.model_dump_json())
            while not download.done.done():
                progress = self._progress_mark(download)
                finished, _ = await asyncio.wait({download.done}, timeout=self.idle_timeout_s)
                if not finished and self._progress_mark(download) == progress:
                    what = "no data" if download.started else "nothing from the agent"
                    raise TransferError(f"event {event_id}: {what} for {self.idle_timeout_s} s")
            return download.done.result()
        except ConnectionClosed as exc:
            raise self._lost(exc) from exc
        finally:
            self._downloads.pop(request.request_id, None)
            if not download.done.done():
                download.done.cancel()
            if not download.started and not download.answered:
                # Its transfer may still come: read it and drop it, the session goes on.
                self._abandoned.add(request.request_id)
            # Stop writing to the .part file before the caller gives its lock up. Shielded:
            # done even if the caller is cancelled meanwhile.
            await asyncio.shield(download.abandon())

    def _progress_mark(self, download: _Download) -> tuple[bool, int, int]:
        """What changes while a download makes progress: its own bytes once its transfer
        started, before that any frame of the session (the transfers queued before it)."""
        if download.started:
            return (True, download.received, 0)
        return (False, 0, self._frames_received)

    async def _request(self, request_id: str, text: str) -> ServerMessage:
        ws = self._require_ws()
        future: asyncio.Future[ServerMessage] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await ws.send(text)
            async with asyncio.timeout(self.request_timeout_s):
                return await future
        except ConnectionClosed as exc:
            raise self._lost(exc) from exc
        except TimeoutError as exc:
            raise ControllerError(
                f"{self.url}: no answer within {self.request_timeout_s} s"
            ) from exc
        finally:
            self._pending.pop(request_id, None)

    def _require_ws(self) -> ClientConnection:
        if self._closed_error is not None:
            raise self._closed_error
        if self._ws is None:
            raise ControllerError("not connected: use 'async with AgentClient(...)'")
        return self._ws

    def _next_id(self) -> str:
        return str(next(self._request_ids))

    # -- notifications --------------------------------------------------------------------------

    async def notifications(self) -> AsyncIterator[Notification]:
        """Events the agent announces (and files it pushed), until the connection ends."""
        while True:
            item = await self._notifications.get()
            if isinstance(item, _ConnectionEnded):
                self._notifications.put_nowait(item)  # later iterators end too
                return
            yield item

    async def next_notification(self) -> Notification:
        """The next notification; raises AgentConnectionError once the connection is gone."""
        item = await self._notifications.get()
        if isinstance(item, _ConnectionEnded):
            self._notifications.put_nowait(item)
            raise self._closed_error or AgentConnectionError(f"{self.url}: connection closed")
        return item

    def _notify(self, item: Notification) -> None:
        # Never block the reader on a slow consumer: that would stall downloads too. What is
        # dropped can be listed again with list_events(since_seq).
        try:
            self._notifications.put_nowait(item)
        except asyncio.QueueFull:
            if not self.notifications_dropped:
                logger.warning("notifications are not being read; dropping (list to catch up)")
            self.notifications_dropped += 1

    # -- the reader -----------------------------------------------------------------------------

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self._frames_received += 1
                if isinstance(raw, bytes):
                    await self._on_chunk(raw)
                else:
                    await self._on_message(_parse(raw))
            self._closed_error = AgentConnectionError(
                f"{self.url}: connection closed (code {ws.close_code})", ws.close_code
            )
        except ConnectionClosed as exc:
            self._closed_error = self._lost(exc)
        except ControllerError as exc:
            # The agent broke the protocol: say so to every waiter and end the session.
            logger.error("%s: %s", self.url, exc)
            self._closed_error = AgentConnectionError(f"{self.url}: {exc}")
            await ws.close(1002, "protocol error")
        finally:
            if self._closed_error is None:  # cancelled
                self._closed_error = AgentConnectionError(f"{self.url}: connection closed")
            await self._fail_everything(self._closed_error)

    async def _fail_everything(self, error: AgentConnectionError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        if self._active is not None:
            await self._active.abort(error)
            self._active = None
        for download in self._downloads.values():
            if not download.done.done():
                download.done.set_exception(error)
        with contextlib.suppress(asyncio.QueueFull):
            self._notifications.put_nowait(_ConnectionEnded())

    def _lost(self, exc: ConnectionClosed) -> AgentConnectionError:
        code = _close_code(exc)
        reason = f": {exc.rcvd.reason}" if exc.rcvd is not None and exc.rcvd.reason else ""
        return AgentConnectionError(f"{self.url}: connection lost (code {code}{reason})", code)

    async def _on_chunk(self, chunk: bytes) -> None:
        if self._active is None:
            raise AgentProtocolError("a binary frame arrived outside a file transfer")
        await self._active.write(chunk)

    async def _on_message(self, message: ServerMessage) -> None:
        if isinstance(message, EventNotice):
            self._notify(message)
        elif isinstance(message, FileStart):
            await self._on_file_start(message)
        elif isinstance(message, FileEnd):
            await self._on_file_end(message)
        elif isinstance(message, ErrorMessage):
            await self._on_error(message)
        elif isinstance(message, EventsPage | Acked):
            future = self._pending.get(message.request_id)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            raise AgentProtocolError(f"unexpected {message.type} message")

    async def _on_file_start(self, message: FileStart) -> None:
        if self._active is not None:
            raise AgentProtocolError("file_start before the previous file_end")
        if message.pushed:
            if self.push_dir is None:
                raise AgentProtocolError("the agent pushed a file to a client not in push mode")
            download = _Download(_Target(self.push_dir, message.event_id, None), 0, pushed=True)
        elif message.request_id in self._abandoned:
            # Its caller gave up (timed out or cancelled) while it was queued: drop the data.
            logger.debug("dropping the transfer of abandoned request %s", message.request_id)
            download = _Download(None, 0, pushed=False)
        else:
            found = self._downloads.get(message.request_id or "")
            if found is None:
                raise AgentProtocolError(f"file_start for unknown request {message.request_id}")
            download = found
        self._active = download
        await download.start(message)

    async def _on_file_end(self, message: FileEnd) -> None:
        download = self._active
        if download is None or download.event_id != message.event_id:
            raise AgentProtocolError("file_end without a matching file_start")
        self._active = None
        self._abandoned.discard(message.request_id or "")
        path = await download.finish(message)
        if download.pushed and path is not None and download.file is not None:
            self._notify(PushedFile(message.event_id, download.seq, path, download.file))

    async def _on_error(self, message: ErrorMessage) -> None:
        error = RequestError(f"{self.url}: {message.message} ({message.code.value})", message.code)
        request_id = message.request_id
        if self._active is not None and (
            request_id == self._active.request_id or (request_id is None and self._active.pushed)
        ):
            # The agent aborted the transfer in progress (e.g. a read error); keep the .part.
            active, self._active = self._active, None
            await active.abort(error)
            return
        if request_id is not None and (future := self._pending.get(request_id)) is not None:
            if not future.done():
                future.set_exception(error)
            return
        if request_id is not None and (download := self._downloads.get(request_id)) is not None:
            download.answered = True
            if not download.done.done():
                download.done.set_exception(error)
            return
        if request_id is not None and request_id in self._abandoned:
            self._abandoned.discard(request_id)
            logger.debug("%s: error for abandoned request %s: %s", self.url, request_id, error)
            return
        log = logger.error if message.fatal else logger.warning
        log("%s: %s", self.url, error)


def _parse(raw: str) -> ServerMessage:
    try:
        return server_message_adapter.validate_json(raw)
    except ValidationError as exc:
        raise AgentProtocolError(f"unreadable message from the agent: {exc.errors()[:1]}") from exc


def _close_code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None


# -- files ----------------------------------------------------------------------------------------


class _Target:
    """Where a download goes: a directory (the agent names the file) or an explicit path."""

    def __init__(self, dest: Path, event_id: str, expected: EventFile | None) -> None:
        self.dest = dest
        self.into_dir = dest.is_dir()
        # Named after the event, not the file: the name is known before the agent answers, so
        # the offset to resume from is too.
        directory = dest if self.into_dir else dest.parent
        self.part_path = directory / f".{event_id}{PART_SUFFIX}"
        self.lock_path = directory / f".{event_id}{PART_SUFFIX}{LOCK_SUFFIX}"
        self.expected = expected

    def final_path(self, name: str) -> Path:
        if not self.into_dir:
            return self.dest
        if not _is_plain_name(name):
            raise TransferError(f"the agent sent an unsafe file name {name[:80]!r}")
        return self.dest / name


def _is_plain_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and ":" not in name
    )


def _already_there(target: _Target, expected: EventFile) -> bool:
    final = target.final_path(expected.name)
    try:
        if final.stat().st_size != expected.size_bytes:
            return False
    except FileNotFoundError:
        return False
    return sha256_of(final) == expected.sha256


def _try_lock(fd: int) -> bool:
    """An exclusive lock on the open file `fd`, released by the OS when it is closed (or the
    process dies); False if someone else holds it."""
    try:
        if sys.platform == "win32":
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError (POSIX), PermissionError (Windows)
        return False
    return True


class _PartFile:
    """The `.part` file of one event, held by one download from before its `get` (the resume
    offset is its size) until it is renamed, discarded or left for a later resume.

    The lock is an OS lock on the companion `.part.lock` file, so it vanishes with a killed
    process. Whoever holds it alone opens, truncates, writes, renames or deletes the `.part`
    file; a second download of the same event gets `PartFileBusyError`. Methods block: call
    them on a worker thread.
    """

    def __init__(self, target: _Target, lock_fd: int, handle: IO[bytes]) -> None:
        self.target = target
        self.path = target.part_path
        self.handle: IO[bytes] | None = handle
        self._lock_fd: int | None = lock_fd

    @classmethod
    def acquire(cls, target: _Target) -> _PartFile:
        """Lock and open (create) the `.part` file; raises `PartFileBusyError`, or
        `TransferError` if it cannot be opened."""
        try:
            lock_fd = cls._lock(target.lock_path)
            try:
                fd = os.open(target.part_path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
                handle = os.fdopen(fd, "r+b")
            except BaseException:
                _unlock(target.lock_path, lock_fd)
                raise
        except PartFileBusyError:
            raise
        except OSError as exc:
            raise TransferError(f"cannot write {target.part_path}: {exc}") from exc
        return cls(target, lock_fd, handle)

    @staticmethod
    def _lock(path: Path) -> int:
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise PartFileBusyError(
                    f"{path.with_suffix('').name} is being written by another download of "
                    "this event; not written, try again later"
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            # The previous holder removed the lock file after we opened it: lock the new one.
            os.close(fd)
        raise PartFileBusyError(f"cannot lock {path.name}: it keeps changing; try again later")

    def _require_handle(self) -> IO[bytes]:
        if self.handle is None:
            raise TransferError(f"{self.path.name} is no longer open")
        return self.handle

    def size(self) -> int:
        return os.fstat(self._require_handle().fileno()).st_size

    def truncate(self) -> None:
        handle = self._require_handle()
        handle.seek(0)
        handle.truncate()

    def hash_prefix(self, offset: int, digest: hashlib._Hash) -> None:
        """Resume: feed the `offset` bytes already held into `digest`, then stand at `offset`."""
        handle = self._require_handle()
        handle.seek(0)
        remaining = offset
        while remaining and (chunk := handle.read(min(remaining, 1024 * 1024))):
            digest.update(chunk)
            remaining -= len(chunk)
        if remaining:
            raise TransferError(f"{self.path.name} changed while resuming")
        handle.truncate()  # nothing beyond `offset` (there is nothing: we hold the lock)

    def commit(self, final: Path, size_bytes: int) -> None:
        """Rename the `.part` file to `final` once it is on disk, checking that the path still
        names the very file that was written (and hashed) through our handle."""
        handle = self._require_handle()
        self.handle = None
        try:
            handle.flush()
            os.fsync(handle.fileno())
            written = os.fstat(handle.fileno())
        finally:
            handle.close()  # before the rename: Windows cannot rename an open file
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(written, current):
            raise TransferError(f"{self.path} was replaced during the download; not renamed")
        if current.st_size != size_bytes:
            raise TransferError(
                f"{self.path} holds {current.st_size} bytes, {size_bytes} were written; not renamed"
            )
        self.path.replace(final)
        fsync_dir(final.parent)

    def discard(self) -> None:
        """Delete the `.part` file (not a prefix of the file, or no longer needed)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            handle.close()
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Close the `.part` file (kept for a later resume) and give the lock up. Idempotent."""
        try:
            if self.handle is not None:
                handle, self.handle = self.handle, None
                handle.close()
        finally:
            if self._lock_fd is not None:
                lock_fd, self._lock_fd = self._lock_fd, None
                _unlock(self.target.lock_path, lock_fd)


_O_BINARY: int = getattr(os, "O_BINARY", 0)


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file and release the lock. On POSIX the file is removed while still
    locked (whoever opened it meanwhile sees it is gone and takes a new one); Windows cannot
    remove an open file: remove it after closing, if nobody opened it meanwhile."""
    if sys.platform == "win32":
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        finally:
            os.close(fd)


class _Download:
    """One transfer into a `.part` file: hashed as it is written, verified, then renamed.

    A pulled download borrows the `.part` file `download()` holds (and releases); a pushed one
    (or one given no `part`) takes it at its `file_start` and releases it itself. Without a
    target it is a sink that reads and drops the transfer of an abandoned request. The reader
    task drives it (start, write, finish, abort); the caller may `abandon` it at any time: the
    lock serialises them.
    """

    def __init__(
        self,
        target: _Target | None,
        offset: int,
        *,
        pushed: bool,
        part: _PartFile | None = None,
    ) -> None:
        self.target = target
        self.offset = offset
        self.pushed = pushed
        self.done: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self.started = False  # its file_start arrived
        self.answered = False  # the agent replied with an error instead of a file_start
        self.received = 0
        self.event_id = ""
        self.request_id: str | None = None
        self.seq = 0
        self.file: EventFile | None = None
        self._part = part
        # Without one lent by `download()` (a pushed transfer), it locks and releases the
        # .part file itself.
        self._owns_part = part is None and target is not None
        self._abandoned = False
        self._lock = asyncio.Lock()
        self._handle: IO[bytes] | None = None  # set while bytes are to be written
        self._writing: asyncio.Future[None] | None = None  # the batch being written
        self._batch: list[bytes] = []  # chunks received, not yet handed to the writer
        self._batch_bytes = 0
        self._digest = hashlib.sha256()
        if target is None:
            self.done.cancel()  # a sink: nobody awaits it

    @property
    def _part_name(self) -> str:
        return self.target.part_path.name if self.target is not None else "(dropped)"

    async def start(self, message: FileStart) -> None:
        self.started = True
        self.event_id = message.event_id
        self.request_id = message.request_id
        self.seq = message.seq
        self.file = message.file
        async with self._lock:
            if self.target is None or self._abandoned:
                return  # read and dropped
            try:
                self._check_start(message)
                if self._owns_part:
                    self._part = await asyncio.to_thread(_PartFile.acquire, self.target)
                    if self.offset == 0:
                        await asyncio.to_thread(self._part.truncate)
                assert self._part is not None
                await asyncio.to_thread(self._part.hash_prefix, self.offset, self._digest)
                self._handle = self._part.handle
            except TransferError as exc:
                await self._close_locked()
                self._fail(exc)
            except OSError as exc:
                await self._close_locked()
                self._fail(TransferError(f"cannot write {self._part_name}: {exc}"))

    def _check_start(self, message: FileStart) -> None:
        assert self.target is not None
        if message.offset != self.offset:
            raise TransferError(f"asked for byte {self.offset}, got {message.offset}")
        expected = self.target.expected
        if expected is not None and (
            expected.size_bytes != message.file.size_bytes or expected.sha256 != message.file.sha256
        ):
            raise TransferError(
                f"event {message.event_id}: the agent's file differs from the expected one"
            )
        self.target.final_path(message.file.name)  # refuse an unsafe name before writing

    async def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self._handle is None:
            return  # failed, abandoned or a sink: let the rest of the transfer pass
        async with self._lock:
            if self._handle is None:
                return
            assert self.file is not None
            if self.offset + self.received > self.file.size_bytes:
                await self._close_locked(discard=True)
                self._fail(TransferError(f"event {self.event_id}: more bytes than announced"))
                return
            self._batch.append(chunk)
            self._batch_bytes += len(chunk)
            if self._batch_bytes < WRITE_BATCH_BYTES:
                return
            try:
                await self._write_batch()
            except OSError as exc:
                await self._close_locked()
                self._fail(TransferError(f"cannot write {self._part_name}: {exc}"))

    async def _write_batch(self) -> None:
        """Hand the chunks received so far to a worker thread (write behind: they go to disk
        and through the hash while the next ones arrive). At most one batch is in flight, so
        at most about two batches are held; one thread hop per batch, not per chunk."""
        await self._settle()
        if not self._batch or self._handle is None:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, self._handle, batch))

    def _write(self, handle: IO[bytes], batch: list[bytes]) -> None:
        for chunk in batch:
            handle.write(chunk)
            self._digest.update(chunk)

    async def _settle(self) -> None:
        """Wait for the batch in flight (shielded: the thread finishes it anyway)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await asyncio.shield(writing)

    async def finish(self, message: FileEnd) -> Path | None:
        async with self._lock:
            return await self._finish_locked()

    async def _finish_locked(self) -> Path | None:
        if self._handle is None:
            return None  # already failed, abandoned, or a sink
        assert self.file is not None
        assert self._part is not None
        try:
            await self._write_batch()
            await self._settle()
        except OSError as exc:
            await self._close_locked()
            self._fail(TransferError(f"cannot write {self._part_name}: {exc}"))
            return None
        self._handle = None
        if self.offset + self.received != self.file.size_bytes:
            await self._close_locked()
            self._fail(
                TransferError(
                    f"event {self.event_id}: file_end after {self.received} "
                    f"of {self.file.size_bytes - self.offset} bytes"
                )
            )
            return None
        try:
            path = await asyncio.to_thread(self._verify_and_rename, self._part, self.file)
        except TransferError as exc:
            await self._close_locked()
            self._fail(exc)
            return None
        except OSError as exc:
            await self._close_locked()
            self._fail(TransferError(f"cannot write {self._part_name}: {exc}"))
            return None
        await self._close_locked()
        logger.info("received %s (%d bytes)", path.name, self.file.size_bytes)
        if not self.done.done():  # cancelled if the caller gave up; the file is good anyway
            self.done.set_result(path)
        return path

    def _verify_and_rename(self, part: _PartFile, file: EventFile) -> Path:
        assert self.target is not None
        size = self.offset + self.received
        digest = self._digest.hexdigest()
        if size != file.size_bytes or digest != file.sha256:
            part.discard()
            raise TransferError(
                f"event {self.event_id}: got {size} bytes with sha256 {digest[:12]}…, expected "
                f"{file.size_bytes} bytes with sha256 {file.sha256[:12]}…; the partial file "
                "was discarded"
            )
        final = self.target.final_path(file.name)
        part.commit(final, file.size_bytes)
        return final

    async def abort(self, error: ControllerError) -> None:
        """The transfer broke off: keep the bytes received (a prefix of the file) for resume."""
        async with self._lock:
            await self._close_locked()
        self._fail(error)

    async def abandon(self) -> None:
        """The caller gives up (or is done): stop writing (the bytes so far stay, a prefix of
        the file), so that it can release the `.part` file. The rest of the transfer, if it
        comes, is read and dropped."""
        async with self._lock:
            self._abandoned = True
            await self._close_locked()

    async def _close_locked(self, *, discard: bool = False) -> None:
        """Write out what was received (unless discarding) and stop writing; a part file this
        download owns is closed and unlocked."""
        if discard:
            self._batch, self._batch_bytes = [], 0
        with contextlib.suppress(OSError):
            await self._write_batch()
        while self._writing is not None:
            with contextlib.suppress(OSError):
                await self._settle()
        self._batch, self._batch_bytes = [], 0
        self._handle = None
        part = self._part
        if part is None:
            return
        with contextlib.suppress(OSError):
            if discard:
                await asyncio.to_thread(part.discard)
            elif part.handle is not None:
                await asyncio.to_thread(part.handle.flush)
        if self._owns_part:
            self._part = None
            with contextlib.suppress(OSError):
                await asyncio.to_thread(part.release)

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        if self.pushed:
            logger.error("pushed file of event %s failed: %s", self.event_id, error)
            # Nobody awaits a pushed transfer; retrieve the exception so asyncio stays quiet.
            self.done.exception()
