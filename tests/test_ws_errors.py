"""Errors the writer finds itself (a `get` it cannot serve, a read failing mid-transfer) reach
the client even while the queue of replies is full.

The writer is the only task that empties that queue, so it must send its own errors rather
than queue them to itself. To catch it at that moment every time, the tests run the agent with
a single worker thread and hold it: the writer then waits on its next file operation while
malformed requests fill the reply queue, and only then is the operation let through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from edge.messages.ws import ErrorCode
from edge.wsserver import WsServer
from edge.wssession import CONTROL_QUEUE_SIZE, Session
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    Agent,
    add_event,
    raw_session,
    running,
    ws_settings,
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as agent:
        yield agent


@pytest.fixture
async def one_worker() -> AsyncIterator[None]:
    """The loop's default executor (behind `asyncio.to_thread`) with a single thread."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="one-worker")
    asyncio.get_running_loop().set_default_executor(executor)
    yield
    executor.shutdown(wait=False)


@contextlib.asynccontextmanager
async def worker_held() -> AsyncIterator[threading.Event]:
    """Occupy the only worker thread until the returned event is set (at the latest on exit):
    every `asyncio.to_thread` call waits behind it."""
    release = threading.Event()
    held = asyncio.get_running_loop().run_in_executor(None, release.wait)
    try:
        yield release
    finally:
        release.set()
        async with asyncio.timeout(TIMEOUT_S):
            await held


class Inbox:
    """Reads everything the agent sends, in the background, so that its sends never wait."""

    def __init__(self, ws: ClientConnection) -> None:
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.bytes_received = 0
        self._task = asyncio.create_task(self._run(ws), name="test inbox")

    async def _run(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                if isinstance(message, bytes):
                    self.bytes_received += len(message)
                else:
                    self.replies.put_nowait(json.loads(message))

    async def next_reply(self) -> dict[str, Any]:
        """The next text message; fails instead of hanging."""
        async with asyncio.timeout(TIMEOUT_S):
            return await self.replies.get()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def inbox_of(ws: ClientConnection) -> AsyncIterator[Inbox]:
    inbox = Inbox(ws)
    try:
        yield inbox
    finally:
        await inbox.close()


async def wait_until_sending_stops(server: WsServer) -> None:
    """Until nothing moves for a while (the client does not read)."""
    last = -1
    async with asyncio.timeout(TIMEOUT_S * 3):
        while server.stats.bytes_sent != last or last <= 0:
            last = server.stats.bytes_sent
            await asyncio.sleep(0.3)


def only_session(server: WsServer) -> Session:
    (session,) = server._sessions
    return session


async def fill_reply_queue(ws: ClientConnection, session: Session) -> int:
    """Send malformed requests until the agent's reply queue is full; return how many."""
    sent = 0
    async with asyncio.timeout(TIMEOUT_S):
        while not session._control.full():
            await ws.send("not json")
            sent += 1
            await asyncio.sleep(0.005)
    assert sent >= CONTROL_QUEUE_SIZE
    return sent


def is_malformed(reply: dict[str, Any]) -> bool:
    return reply["type"] == "error" and reply["code"] == ErrorCode.MALFORMED_JSON


async def expect_error_then_replies(
    inbox: Inbox, code: ErrorCode, request_id: str, malformed: int
) -> None:
    """The get's `error` arrives, and every queued reply too (some may come before it)."""
    while is_malformed(reply := await inbox.next_reply()):
        malformed -= 1
    assert (reply["type"], reply["code"], reply["request_id"]) == ("error", code, request_id)
    for _ in range(malformed):
        assert is_malformed(await inbox.next_reply())


@pytest.mark.usefixtures("one_worker")
@pytest.mark.parametrize("problem", ["unknown event", "file resized"])
async def test_a_get_refused_while_the_reply_queue_is_full_is_answered(
    agent: Agent, problem: str
) -> None:
    if problem == "unknown event":
        event_id, code = "0" * 32, ErrorCode.UNKNOWN_EVENT
    else:
        record = add_event(agent.store, frames=1000)
        path = agent.store.file_for(record.event_id)
        assert path is not None
        os.truncate(path, 10)  # the open refuses a file whose size differs from the log's
        event_id, code = record.event_id, ErrorCode.FILE_UNAVAILABLE
    async with (
        running(agent.server(ws_settings())) as server,
        raw_session(server) as ws,
        inbox_of(ws) as inbox,
    ):
        async with worker_held() as release:  # the writer's look-up waits for the worker
            await ws.send(json.dumps({"type": "get", "request_id": "g", "event_id": event_id}))
            malformed = await fill_reply_queue(ws, only_session(server))
            release.set()
            await expect_error_then_replies(inbox, code, "g", malformed)
        await ws.send(json.dumps({"type": "list", "request_id": "alive"}))
        assert (await inbox.next_reply())["type"] == "events"  # the connection survived


@pytest.mark.usefixtures("one_worker")
async def test_a_read_failing_mid_transfer_while_the_reply_queue_is_full_is_reported(
    agent: Agent,
) -> None:
    # Chunks read on a worker thread (ReadAhead); sendfile reads on the loop, right after the
    # writer has emptied the reply queue, so it cannot meet a full one.
    record = add_event(agent.store, frames=8_000_000)  # 16 MB: more than the socket buffers
    assert record.file is not None
    path = agent.store.file_for(record.event_id)
    assert path is not None
    async with (
        running(agent.server(ws_settings(sendfile=False))) as server,
        raw_session(server) as ws,
    ):
        ws.transport.pause_reading()  # the transfer stalls
        await ws.send(json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id}))
        # Until the writer waits in a send: the read ahead of it, already queued, is done.
        await wait_until_sending_stops(server)
        async with worker_held() as release:  # the next read waits for the worker
            os.truncate(path, 0)  # never happens to a finished event; a disk failure looks so
            async with inbox_of(ws) as inbox:
                ws.transport.resume_reading()
                assert (await inbox.next_reply())["type"] == "file_start"
                # The writer sends what it has read, then waits for the read it cannot get.
                malformed = await fill_reply_queue(ws, only_session(server))
                release.set()
                await expect_error_then_replies(inbox, ErrorCode.FILE_UNAVAILABLE, "g", malformed)
                assert 0 < inbox.bytes_received < record.file.size_bytes
                await ws.send(json.dumps({"type": "list", "request_id": "alive"}))
                assert (await inbox.next_reply())["type"] == "events"  # the connection survived
