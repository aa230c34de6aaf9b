"""One websocket client of the agent, from `hello` to disconnect.

A `Session` runs three tasks: a reader that parses requests, a writer that owns every send on
the socket, and a notifier that turns bus events into `event` messages and, in push mode, into
queued transfers. The queues between them are bounded and every send is awaited, so a slow
client stalls its own session (and, through TCP, itself) rather than making the agent buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, NoReturn

from pydantic import ValidationError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from edge import __version__
from edge.bus import EventFinished, EventStarted, Subscription
from edge.errors import StorageError
from edge.messages.common import EventRecord, WireModel
from edge.messages.ws import (
    CLIENT_MESSAGE_TYPES,
    MAX_CONTROL_MESSAGE_BYTES,
    MAX_PAGE_SIZE,
    PROTOCOL_VERSION,
    SUPPORTED_PROTOCOLS,
    Acked,
    AckRequest,
    ClientConfig,
    CloseCode,
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
    client_message_adapter,
)
from edge.timeutil import utc_now
from edge.wsfiles import FileFrames, NotTheRecordedFileError, ReadAhead, open_in_thread

if TYPE_CHECKING:
    from edge.wsserver import WsServer

logger = logging.getLogger(__name__)

CAPABILITIES = ("list", "get", "resume", "ack", "notify", "push")
# Replies and notifications waiting for the writer. Small on purpose: a list page can be a few
# hundred kB, and a client that does not read must not make the agent hold many of them.
CONTROL_QUEUE_SIZE = 8
PENDING_TRANSFERS = 8  # `get` requests queued behind the one being sent
BUS_QUEUE_SIZE = 64  # bus events per client before it resyncs from the event log
RESYNC_PAGE = 100
CLOSE_BUDGET_S = 10.0  # longest wait to tell a refused client why, before dropping it


@dataclass
class WsStats:
    """Totals since the server started; for health and tests."""

    connections: int = 0
    refused: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    bytes_sendfile: int = 0  # the part of bytes_sent that went by sendfile, without a copy
    errors_sent: int = 0
    internal_errors: int = 0  # sessions that ended on a bug in the agent (logged)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A file waiting to be sent: a `get`, or a push of a new event."""

    event_id: str
    offset: int
    request_id: str | None  # None: pushed
    pushed: bool


class HandshakeFailedError(Exception):
    """The handshake failed and the connection was closed with a documented code."""


class ClientStalledError(Exception):
    """The client stopped reading; its connection was aborted."""


async def close_with_error(
    ws: ServerConnection, code: ErrorCode, message: str, close_code: CloseCode
) -> None:
    """Say why in an `error` message, then close with the documented code."""
    error = ErrorMessage(code=code, message=message, fatal=True)
    try:
        # Bounded: a client that does not read could otherwise hold the send (and the close
        # handshake) forever.
        async with asyncio.timeout(CLOSE_BUDGET_S):
            await ws.send(error.model_dump_json())
            await ws.close(close_code, code.value)
    except TimeoutError:
        ws.transport.abort()
    except ConnectionClosed:
        pass  # already gone: nothing left to tell


class Session:
    """One connected client, from `hello` to disconnect."""

    def __init__(self, server: WsServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.store = server.store
        self.name = f"{ws.remote_address}"
        self.config = ClientConfig(download_mode="off")
        self.last_seq = 0  # newest finished event announced to this client
        self._control: asyncio.Queue[str] = asyncio.Queue(CONTROL_QUEUE_SIZE)
        self._transfers: asyncio.Queue[Transfer] = asyncio.Queue(PENDING_TRANSFERS)
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None  # the one task that empties _control

    # -- handshake ------------------------------------------------------------------------------

    async def run(self) -> None:
        hello = await self._handshake()
        self.config = hello.config
        self.name = f"{hello.client_id}@{self.ws.remote_address}"
        # Subscribe before reading newest_seq: an event finishing in between is then in the
        # queue, and the seq check in the notifier drops what welcome already covers.
        subscription = self.server.bus.subscribe(f"ws:{self.name}", BUS_QUEUE_SIZE)
        try:
            self.last_seq = await asyncio.to_thread(lambda: self.store.newest_seq)
            await self._send(self._welcome().model_dump_json())
            logger.info("client %s connected (%s)", self.name, self.config.download_mode)
            await self._serve(subscription)
        finally:
            self.server.bus.unsubscribe(subscription)

    def _welcome(self) -> Welcome:
        settings = self.server.settings
        return Welcome(
            protocol=PROTOCOL_VERSION,
            device_id=self.server.device_id,
            agent_version=__version__,
            capabilities=list(CAPABILITIES),
            config=self.config,
            # mode="json" masks every SecretStr (tokens, passwords) as '**********'.
            settings=self.server.runtime.settings.model_dump(mode="json"),
            newest_seq=self.last_seq,
            chunk_bytes=settings.chunk_bytes,
            max_message_bytes=MAX_CONTROL_MESSAGE_BYTES,
            server_time=utc_now(),
        )

    async def _handshake(self) -> Hello:
        timeout_s = self.server.settings.hello_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            await self._fail(
                ErrorCode.HELLO_TIMEOUT, f"no hello within {timeout_s:g} s", CloseCode.HELLO_TIMEOUT
            )
        if isinstance(raw, bytes) or len(raw) > MAX_CONTROL_MESSAGE_BYTES:
            await self._fail(
                ErrorCode.HELLO_REQUIRED,
                "the first message must be a JSON text frame of type 'hello'",
                CloseCode.HANDSHAKE_FAILED,
            )
        data = _parse_json(raw)
        if not isinstance(data, dict) or data.get("type") != "hello":
            await self._fail(
                ErrorCode.HELLO_REQUIRED,
                "the first message must be a JSON object of type 'hello'",
                CloseCode.HANDSHAKE_FAILED,
            )
        # Authenticate before looking further, so an unknown peer learns nothing else. A
        # header token was already checked before the upgrade; without one, hello carries it.
        request = self.ws.request
        header_ok = request is not None and self.server.headers_token_ok(request.headers)
        hello_token = data.get("token")
        if not header_ok and not (
            isinstance(hello_token, str) and self.server.check_token(hello_token)
        ):
            logger.warning("refused a client with a missing or wrong token from %s", self.name)
            await self._fail(
                ErrorCode.UNAUTHORIZED,
                "missing or wrong token (Authorization: Bearer header or hello.token)",
                CloseCode.UNAUTHORIZED,
            )
        if (refusal := self.server.admit(self)) is not None:
            await self._fail(ErrorCode.TOO_MANY_CLIENTS, refusal, CloseCode.TRY_AGAIN_LATER)
        protocol = data.get("protocol")
        if protocol not in SUPPORTED_PROTOCOLS or isinstance(protocol, bool):
            supported = ", ".join(str(v) for v in sorted(SUPPORTED_PROTOCOLS))
            await self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol {json.dumps(protocol)[:20]} is not supported; this agent speaks "
                f"{supported}",
                CloseCode.UNSUPPORTED_VERSION,
            )
        try:
            return Hello.model_validate(data)
        except ValidationError as exc:
            await self._fail(
                ErrorCode.INVALID_MESSAGE,
                f"invalid hello: {_describe(exc)}",
                CloseCode.HANDSHAKE_FAILED,
            )

    async def _fail(self, code: ErrorCode, message: str, close_code: CloseCode) -> NoReturn:
        logger.info("closing %s: %s (%s)", self.name, message, code.value)
        await close_with_error(self.ws, code, message, close_code)
        raise HandshakeFailedError(message)

    # -- the three tasks ------------------------------------------------------------------------

    async def _serve(self, subscription: Subscription) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-write {self.name}")
        tasks = [
            asyncio.create_task(self._read_loop(), name=f"ws-read {self.name}"),
            self._writer,
            asyncio.create_task(self._notify_loop(subscription), name=f"ws-notify {self.name}"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def _read_loop(self) -> None:
        async for raw in self.ws:
            await self._dispatch(raw)

    async def _write_loop(self) -> None:
        """The only sender after `welcome`: replies, notifications, then transfers in order.

        It sends its own messages (`file_start`, `file_end`, a transfer's `error`) itself and
        never waits on the queues it empties: a full reply queue would wait for it forever.
        """
        while True:
            self._wakeup.clear()
            await self._flush_control()
            if not self._transfers.empty():
                await self._send_file(self._transfers.get_nowait())
            elif self._control.empty():
                await self._wakeup.wait()

    async def _notify_loop(self, subscription: Subscription) -> None:
        while True:
            event = await subscription.get()
            if subscription.overflowed:
                subscription.overflowed = False
                logger.info("client %s fell behind the bus; resyncing", self.name)
                await self._resync()
            if isinstance(event, EventStarted):
                try:
                    notice = EventNotice(
                        kind="start",
                        event_id=event.event_id,
                        seq=event.seq,
                        onset_time=event.onset_time,
                        record=None,
                    )
                except ValidationError as exc:
                    # A start notice is only a courtesy; a bad one must not end the session.
                    logger.error("cannot announce the start of %s: %s", event.event_id, exc)
                    continue
                await self._queue(notice)
            elif isinstance(event, EventFinished) and event.record.seq > self.last_seq:
                if event.record.seq == self.last_seq + 1:
                    await self._announce(event.record)
                else:
                    # A gap: an event reached the log without a bus message (or a seq was
                    # reserved and never used). The log says which; it includes this one.
                    await self._resync()

    async def _resync(self) -> None:
        """Announce what the bus dropped, from the event log, in seq order."""
        logger.debug("client %s: resyncing from seq %d", self.name, self.last_seq)
        while records := await asyncio.to_thread(
            self.store.records_since, self.last_seq, RESYNC_PAGE
        ):
            for record in records:
                await self._announce(record)

    async def _announce(self, record: EventRecord) -> None:
        self.last_seq = record.seq
        notice = EventNotice(
            kind="end",
            event_id=record.event_id,
            seq=record.seq,
            onset_time=record.onset_time,
            record=record,
        )
        await self._queue(notice)
        if (
            self.config.download_mode == "push"
            and record.file is not None
            and record.file.format in self.config.formats
        ):
            # Waits when the transfer queue is full; the bus then overflows and we resync.
            await self._transfers.put(Transfer(record.event_id, 0, None, pushed=True))
            self._wakeup.set()

    # -- requests -------------------------------------------------------------------------------

    async def _dispatch(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            await self._error(
                ErrorCode.BINARY_NOT_ACCEPTED, "the agent accepts only JSON text frames"
            )
            return
        if len(raw) > MAX_CONTROL_MESSAGE_BYTES:
            await self._error(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"control messages are at most {MAX_CONTROL_MESSAGE_BYTES} bytes",
            )
            return
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            await self._error(ErrorCode.MALFORMED_JSON, "the message is not valid JSON")
            return
        if not isinstance(data, dict):
            await self._error(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object")
            return
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not 1 <= len(request_id) <= 64:
            request_id = None
        kind = data.get("type")
        if not isinstance(kind, str) or kind not in CLIENT_MESSAGE_TYPES:
            known = ", ".join(sorted(CLIENT_MESSAGE_TYPES - {"hello"}))
            await self._error(
                ErrorCode.UNKNOWN_TYPE,
                f"unknown message type {json.dumps(kind)[:40]}; known: {known}",
                request_id,
            )
            return
        try:
            message = client_message_adapter.validate_python(data)
        except ValidationError as exc:
            await self._error(
                ErrorCode.INVALID_MESSAGE, f"invalid {kind}: {_describe(exc)}", request_id
            )
            return
        if isinstance(message, Hello):
            await self._error(ErrorCode.NOT_ALLOWED, "hello was already received", request_id)
        elif isinstance(message, ListRequest):
            await self._list(message)
        elif isinstance(message, GetRequest):
            await self._get(message)
        else:
            await self._ack(message)

    async def _list(self, request: ListRequest) -> None:
        page_size = min(request.page_size, MAX_PAGE_SIZE)
        records = await asyncio.to_thread(
            self.store.records_since, request.since_seq, page_size + 1
        )
        newest = await asyncio.to_thread(lambda: self.store.newest_seq)
        page = EventsPage(
            request_id=request.request_id,
            events=records[:page_size],
            more=len(records) > page_size,
            newest_seq=newest,
        )
        await self._queue(page)

    async def _get(self, request: GetRequest) -> None:
        if self.config.download_mode == "off":
            await self._error(
                ErrorCode.NOT_ALLOWED,
                "this session's download_mode is 'off'; say 'pull' or 'push' in hello",
                request.request_id,
            )
            return
        try:
            self._transfers.put_nowait(
                Transfer(request.event_id, request.offset, request.request_id, pushed=False)
            )
        except asyncio.QueueFull:
            await self._error(
                ErrorCode.TOO_MANY_REQUESTS,
                f"at most {PENDING_TRANSFERS} transfers may wait; retry after a file_end",
                request.request_id,
            )
            return
        self._wakeup.set()

    async def _ack(self, request: AckRequest) -> None:
        try:
            known = await asyncio.to_thread(self.store.mark_collected, request.event_id)
        except StorageError as exc:
            logger.error("cannot record the ack of %s: %s", request.event_id, exc)
            await self._error(
                ErrorCode.INTERNAL, "the agent could not record the ack", request.request_id
            )
            return
        if not known:
            await self._error(
                ErrorCode.UNKNOWN_EVENT, f"no event {request.event_id}", request.request_id
            )
            return
        logger.debug("client %s collected %s", self.name, request.event_id)
        await self._queue(Acked(request_id=request.request_id, event_id=request.event_id))

    # -- sending --------------------------------------------------------------------------------

    async def _queue(self, message: WireModel) -> None:
        """Hand a message to the writer; waits while the client is behind (backpressure).

        Only for the reader and the notifier: the writer would wait for itself on a full queue.
        """
        if asyncio.current_task() is self._writer:
            raise RuntimeError("the writer queued a message to itself; it must send it")
        await self._control.put(message.model_dump_json())
        self._wakeup.set()

    async def _error(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        """Queue an `error` reply for the writer (from the reader)."""
        await self._queue(self._error_message(code, message, request_id))

    async def _send_error(self, code: ErrorCode, message: str, request_id: str | None) -> None:
        """The writer's own `error` for a transfer, sent at once where its `file_start` or
        `file_end` would have gone; replies already queued follow it."""
        await self._send(self._error_message(code, message, request_id).model_dump_json())

    def _error_message(self, code: ErrorCode, message: str, request_id: str | None) -> ErrorMessage:
        self.server.stats.errors_sent += 1
        logger.debug("client %s: %s: %s", self.name, code.value, message)
        return ErrorMessage(code=code, message=message, request_id=request_id)

    async def _send(self, data: str | bytes) -> None:
        """Send one frame; drop the client if it has not taken any data for the stall time."""
        async with self._stall_guard():
            await self.ws.send(data)

    @contextlib.asynccontextmanager
    async def _stall_guard(self) -> AsyncIterator[None]:
        """Around a wait for the client to take data: drop it after the stall time.

        websockets waits for the write buffer to drain without a deadline, and its keepalive
        cannot get a ping through a full buffer, so a client that stays connected but stops
        reading would otherwise hold its slot forever.
        """
        try:
            async with asyncio.timeout(self.server.stall_timeout_s):
                yield
        except TimeoutError:
            logger.warning(
                "client %s took nothing for %g s; dropping it",
                self.name,
                self.server.stall_timeout_s,
            )
            self.ws.transport.abort()
            raise ClientStalledError(self.name) from None

    async def _flush_control(self) -> None:
        while not self._control.empty():
            await self._send(self._control.get_nowait())

    async def _send_file(self, job: Transfer) -> None:
        """Send one file from job.offset, reading lazily; replies interleave between chunks.

        `file_unavailable` is final for the client: it is sent only when the file the log
        recorded is no longer there (see `_is_lost`). A read that fails for a reason that can
        pass (EMFILE, EIO from a flaky card, ...) gets a non-fatal `internal` error, which
        clients retry: the file stays on the agent, uncollected, and must not be written off.
        """
        try:
            record = await asyncio.to_thread(self.store.get, job.event_id)
            path = await asyncio.to_thread(self.store.file_for, job.event_id)
        except StorageError as exc:
            logger.error("cannot look up event %s for a transfer: %s", job.event_id, exc)
            await self._send_error(
                ErrorCode.INTERNAL,
                f"the agent could not read its record of event {job.event_id}; try again later",
                job.request_id,
            )
            return
        if record is None:
            await self._send_error(
                ErrorCode.UNKNOWN_EVENT, f"no event {job.event_id}", job.request_id
            )
            return
        if path is None or record.file is None:
            await self._send_gone(job)
            return
        size = record.file.size_bytes
        if job.offset > size:
            await self._send_error(
                ErrorCode.INVALID_OFFSET,
                f"offset {job.offset} is beyond the end of the file ({size} bytes)",
                job.request_id,
            )
            return
        try:
            handle = await open_in_thread(path, self.store.events_dir, size, job.offset)
        except OSError as exc:
            logger.error("cannot send %s: %s", path.name, exc)
            await self._send_read_failed(job, exc, f"cannot read the file of event {job.event_id}")
            return
        try:
            await self._stream(job, record, handle, size)  # closes the handle
        except OSError as exc:
            logger.error("reading %s failed during a transfer: %s", path.name, exc)
            await self._send_read_failed(
                job,
                exc,
                f"reading the file of event {job.event_id} failed; the transfer is aborted",
            )

    async def _send_gone(self, job: Transfer) -> None:
        await self._send_error(
            ErrorCode.FILE_UNAVAILABLE,
            f"the file of event {job.event_id} is gone (retention or loss)",
            job.request_id,
        )

    async def _send_read_failed(self, job: Transfer, exc: OSError, message: str) -> None:
        """The answer to an OSError while opening or reading a file the store held."""
        if _is_lost(exc) or await asyncio.to_thread(self.store.file_for, job.event_id) is None:
            # Lost on disk, or deleted by retention since the look-up.
            await self._send_error(ErrorCode.FILE_UNAVAILABLE, message, job.request_id)
            return
        await self._send_error(ErrorCode.INTERNAL, f"{message}; try again later", job.request_id)

    async def _stream(
        self, job: Transfer, record: EventRecord, handle: IO[bytes], size: int
    ) -> None:
        assert record.file is not None
        if self.server.settings.sendfile and FileFrames.usable(self.ws):
            try:
                await self._send_chunks(job, record, self._send_frames(handle, job.offset, size))
            finally:
                handle.close()
            return
        # Created first: it owns the handle from here on and starts reading while we send.
        reader = ReadAhead(handle, size - job.offset, self.server.settings.chunk_bytes)
        try:
            await self._send_chunks(job, record, self._send_read_ahead(reader))
        finally:
            reader.release()

    async def _send_read_ahead(self, reader: ReadAhead) -> AsyncGenerator[int]:
        """Chunks read on a worker thread, sent as messages; yields the size of each."""
        while chunk := await reader.next_chunk():
            await self._send(chunk)  # returns once the transport is below write_limit
            yield len(chunk)

    async def _send_frames(self, handle: IO[bytes], offset: int, size: int) -> AsyncGenerator[int]:
        """Chunks sent by sendfile where the socket is idle, else as messages; yields sizes."""
        frames = FileFrames(self.ws, handle)
        chunk_bytes = self.server.settings.chunk_bytes
        try:
            while offset < size:
                count = min(chunk_bytes, size - offset)
                if frames.write_frame(offset, count):
                    async with self._stall_guard():
                        await frames.drain()
                else:
                    await self._send(frames.read(offset, count))
                offset += count
                yield count
        finally:
            self.server.stats.bytes_sendfile += frames.bytes_zero_copy

    async def _send_chunks(
        self, job: Transfer, record: EventRecord, chunks: AsyncGenerator[int]
    ) -> None:
        assert record.file is not None
        start = FileStart(
            request_id=job.request_id,
            pushed=job.pushed,
            event_id=job.event_id,
            seq=record.seq,
            file=record.file,
            offset=job.offset,
            chunk_bytes=self.server.settings.chunk_bytes,
        )
        await self._send(start.model_dump_json())
        async with contextlib.aclosing(chunks):
            async for count in chunks:
                self.server.stats.bytes_sent += count
                await self._flush_control()  # replies and notifications go between chunks
        sent = record.file.size_bytes - job.offset
        end = FileEnd(request_id=job.request_id, event_id=job.event_id, bytes_sent=sent)
        await self._send(end.model_dump_json())
        self.server.stats.files_sent += 1
        logger.debug("sent %s to %s from byte %d", record.file.name, self.name, job.offset)


def _is_lost(exc: OSError) -> bool:
    """Whether an OSError from opening or reading an event file means the file the log
    recorded is no longer there, for good: the file is missing, or `edge.wsfiles` found one
    that is not it. Other errors from the system (EMFILE, ENFILE, EIO, EACCES, ...) can pass,
    and the client is to try again.
    """
    return isinstance(exc, FileNotFoundError | NotTheRecordedFileError)


def _parse_json(raw: str) -> object:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _describe(exc: ValidationError, limit: int = 3) -> str:
    """A short account of what was wrong, naming fields; never echoes the input back."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)[:300]
