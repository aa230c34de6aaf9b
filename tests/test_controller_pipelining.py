"""Pipelined `get`s on one AgentClient session: a queued download is not timed out while the
transfers before it are busy, and a download abandoned while queued does not end the session.

The agent here is a small scripted one on a real loopback websocket, so that the pace of its
transfers is exact (a slow link) whatever the load of the test machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from controller.wsclient import AgentClient
from edge.messages.common import EventFile
from edge.messages.ws import FileEnd, FileStart, Welcome
from edge.timeutil import utc_now
from tests.fixtures.ws_helpers import TIMEOUT_S, listing

CHUNK_BYTES = 4096


@dataclass
class ScriptedFile:
    event_id: str
    seq: int
    data: bytes

    @property
    def file(self) -> EventFile:
        return EventFile(
            name=f"pi1_{self.seq:06d}.wav",
            size_bytes=len(self.data),
            sha256=hashlib.sha256(self.data).hexdigest(),
            format="wav",
            duration_s=1.0,
            samplerate=8000,
            channels=1,
        )


@dataclass
class ScriptedAgent:
    """Answers hello, then serves `get`s one after the other (as the real agent does: later
    `get`s queue behind the transfer in progress), one chunk every `chunk_delay_s`."""

    files: dict[str, ScriptedFile]
    chunk_delay_s: float
    gets: list[str] = field(default_factory=list)  # request ids, in order received
    port: int = 0

    async def handle(self, ws: ServerConnection) -> None:
        await ws.recv()  # hello
        welcome = Welcome(
            protocol=1,
            device_id="pi1",
            agent_version="scripted",
            capabilities=["list", "get", "resume", "ack"],
            config={"download_mode": "pull"},  # type: ignore[arg-type]
            settings={},
            newest_seq=0,
            chunk_bytes=CHUNK_BYTES,
            max_message_bytes=16384,
            server_time=utc_now(),
        )
        await ws.send(welcome.model_dump_json())
        queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for raw in ws:
                    message = json.loads(raw)
                    self.gets.append(str(message["request_id"]))
                    await queue.put(message)
            finally:
                queue.put_nowait(None)  # the client went away

        reader = asyncio.create_task(read())
        try:
            while (get := await queue.get()) is not None:
                await self._send(ws, str(get["request_id"]), str(get["event_id"]), get["offset"])
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _send(
        self, ws: ServerConnection, request_id: str, event_id: str, offset: object
    ) -> None:
        scripted = self.files[event_id]
        assert isinstance(offset, int)
        start = FileStart(
            request_id=request_id,
            pushed=False,
            event_id=event_id,
            seq=scripted.seq,
            file=scripted.file,
            offset=offset,
            chunk_bytes=CHUNK_BYTES,
        )
        await ws.send(start.model_dump_json())
        for position in range(offset, len(scripted.data), CHUNK_BYTES):
            await asyncio.sleep(self.chunk_delay_s)
            await ws.send(scripted.data[position : position + CHUNK_BYTES])
        end = FileEnd(
            request_id=request_id, event_id=event_id, bytes_sent=len(scripted.data) - offset
        )
        await ws.send(end.model_dump_json())


@contextlib.asynccontextmanager
async def scripted_agent(agent: ScriptedAgent) -> AsyncIterator[str]:
    async with serve(agent.handle, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


def scripted_file(seq: int, size: int) -> ScriptedFile:
    return ScriptedFile(event_id=os.urandom(16).hex(), seq=seq, data=os.urandom(size))


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    directory.mkdir()
    return directory


async def test_a_queued_download_is_not_timed_out_while_the_link_is_busy(dest: Path) -> None:
    # The first transfer takes about 20 x 0.05 = 1 s, twice the idle timeout; the second
    # waits behind it. Both must arrive, on the same session.
    long, short = scripted_file(1, 20 * CHUNK_BYTES), scripted_file(2, 2 * CHUNK_BYTES)
    agent = ScriptedAgent({f.event_id: f for f in (long, short)}, chunk_delay_s=0.05)
    async with (
        scripted_agent(agent) as url,
        AgentClient(url, "token", "pc-1", idle_timeout_s=0.5) as client,
        asyncio.timeout(TIMEOUT_S),
    ):
        first = asyncio.create_task(client.download(long.event_id, dest, long.file))
        while not agent.gets:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(client.download(short.event_id, dest, short.file))
        paths = await asyncio.gather(first, second)
        assert [p.read_bytes() for p in paths] == [long.data, short.data]
        assert client.connected
    assert listing(dest) == sorted([long.file.name, short.file.name])


async def test_a_download_abandoned_while_queued_does_not_end_the_session(dest: Path) -> None:
    # The caller of the second download gives up while it waits; its transfer still comes
    # afterwards and must be dropped quietly: the session and a third download go on.
    long, dropped, third = (scripted_file(1, 10 * CHUNK_BYTES), scripted_file(2, 3 * CHUNK_BYTES),
                            scripted_file(3, 2 * CHUNK_BYTES))  # fmt: skip
    agent = ScriptedAgent({f.event_id: f for f in (long, dropped, third)}, chunk_delay_s=0.02)
    async with (
        scripted_agent(agent) as url,
        AgentClient(url, "token", "pc-1", idle_timeout_s=5.0) as client,
        asyncio.timeout(TIMEOUT_S),
    ):
        first = asyncio.create_task(client.download(long.event_id, dest, long.file))
        while not agent.gets:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(client.download(dropped.event_id, dest, dropped.file))
        while len(agent.gets) < 2:
            await asyncio.sleep(0.01)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        # Its .part file is free again at once: another download of it may start.
        assert not (dest / f".{dropped.event_id}.part.lock").exists()
        assert (await first).read_bytes() == long.data
        assert (await client.download(third.event_id, dest, third.file)).read_bytes() == third.data
        assert client.connected
    assert not (dest / dropped.file.name).exists()  # dropped, not written
