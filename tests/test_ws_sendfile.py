"""File chunks by sendfile(2) on plain ws://, and the client's batched writes.

Both send paths deliver the same bytes; keepalive pings and replies never split a frame, also
when the socket is full and part of a chunk goes through the transport's buffer; a file cut
short during a transfer is reported without losing the connection.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.errors import AgentConnectionError
from controller.wsclient import WRITE_BATCH_BYTES, AgentClient, _Download, _Target
from edge.messages.common import EventRecord
from edge.messages.ws import ErrorCode, FileStart
from edge.wsfiles import binary_frame_header
from edge.wsserver import WsServer
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    TOKEN,
    Agent,
    add_event,
    raw_session,
    recv_json,
    running,
    url_of,
    ws_settings,
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as agent:
        yield agent


def stored_bytes(agent: Agent, record: EventRecord) -> bytes:
    path = agent.store.file_for(record.event_id)
    assert path is not None
    return path.read_bytes()


async def wait_until_sending_stops(server: WsServer) -> None:
    """Until nothing moves for a while (the client does not read)."""
    last = -1
    async with asyncio.timeout(TIMEOUT_S * 3):
        while server.stats.bytes_sent != last or last <= 0:
            last = server.stats.bytes_sent
            await asyncio.sleep(0.3)


def test_frame_headers_use_the_shortest_length_encoding() -> None:
    assert binary_frame_header(125) == bytes([0x82, 125])
    assert binary_frame_header(126) == bytes([0x82, 126, 0, 126])
    assert binary_frame_header(65535) == bytes([0x82, 126, 0xFF, 0xFF])
    assert binary_frame_header(65536) == bytes([0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0])


@pytest.mark.parametrize("sendfile", [True, False])
async def test_both_send_paths_deliver_the_same_bytes(
    agent: Agent, tmp_path: Path, sendfile: bool
) -> None:
    record = add_event(agent.store, frames=1_000_000)  # 2 MB in 64 KiB chunks
    assert record.file is not None
    async with running(agent.server(ws_settings(sendfile=sendfile))) as server:
        async with AgentClient(url_of(server), TOKEN, "pc-1") as client:
            path = await client.download(record.event_id, tmp_path, record.file)
        assert path.read_bytes() == stored_bytes(agent, record)
        assert server.stats.bytes_sent == record.file.size_bytes
        assert (server.stats.bytes_sendfile > 0) == sendfile


async def test_pings_and_replies_go_between_frames_when_the_socket_is_full(
    agent: Agent,
) -> None:
    record = add_event(agent.store, frames=8_000_000)  # 16 MB, more than the socket buffers
    assert record.file is not None
    settings = ws_settings(ping_interval_s=0.01, ping_timeout_s=TIMEOUT_S)
    async with running(agent.server(settings)) as server, raw_session(server) as ws:
        ws.transport.pause_reading()  # the socket fills: chunks end up partly in the buffer
        await ws.send(json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id}))
        await wait_until_sending_stops(server)
        ws.transport.resume_reading()
        assert (await recv_json(ws))["type"] == "file_start"
        received = bytearray()
        replies = 0
        async with asyncio.timeout(TIMEOUT_S * 3):
            while True:
                message = await ws.recv()
                if isinstance(message, bytes):
                    received += message
                    if len(received) % (1024 * 1024) == 0:
                        await ws.send(json.dumps({"type": "list", "request_id": "l"}))
                        await asyncio.sleep(0.02)  # slow: keepalive pings go out meanwhile
                    continue
                reply = json.loads(message)
                if reply["type"] == "file_end":
                    break
                assert reply["type"] == "events", reply
                replies += 1
        assert bytes(received) == stored_bytes(agent, record)
        assert replies > 0
        (session,) = server._sessions
        assert session.ws.latency > 0  # pongs to the agent's keepalive pings came back
        # Most went by sendfile; what the full socket did not take went through the buffer.
        assert 0 < server.stats.bytes_sendfile < record.file.size_bytes


@pytest.mark.parametrize("sendfile", [True, False])
async def test_a_file_cut_short_during_a_transfer_is_reported(agent: Agent, sendfile: bool) -> None:
    record = add_event(agent.store, frames=8_000_000)  # 16 MB
    assert record.file is not None
    path = agent.store.file_for(record.event_id)
    assert path is not None
    async with (
        running(agent.server(ws_settings(sendfile=sendfile))) as server,
        raw_session(server) as ws,
    ):
        ws.transport.pause_reading()
        await ws.send(json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id}))
        await wait_until_sending_stops(server)
        os.truncate(path, 0)  # never happens to a finished event; a disk failure looks like it
        ws.transport.resume_reading()
        assert (await recv_json(ws))["type"] == "file_start"
        received = 0
        async with asyncio.timeout(TIMEOUT_S):
            while isinstance(message := await ws.recv(), bytes):
                received += len(message)
        reply = json.loads(message)
        assert (reply["type"], reply["code"]) == ("error", ErrorCode.FILE_UNAVAILABLE)
        assert reply["request_id"] == "g"
        assert 0 < received < record.file.size_bytes
        await ws.send(json.dumps({"type": "list", "request_id": "alive"}))
        assert (await recv_json(ws))["type"] == "events"  # the connection survived


async def test_an_aborted_download_keeps_every_byte_received(agent: Agent, tmp_path: Path) -> None:
    record = add_event(agent.store, frames=1_000_000)
    assert record.file is not None
    data = stored_bytes(agent, record)
    download = _Download(_Target(tmp_path, record.event_id, record.file), 0, pushed=False)
    start = FileStart(
        request_id="1",
        pushed=False,
        event_id=record.event_id,
        seq=record.seq,
        file=record.file,
        offset=0,
        chunk_bytes=65536,
    )
    await download.start(start)
    held = 65536 * 5 + 1000  # less than one batch: nothing written yet
    assert held < WRITE_BATCH_BYTES
    for offset in range(0, held, 65536):
        await download.write(data[offset : min(offset + 65536, held)])
    await download.abort(AgentConnectionError("cut"))
    part = tmp_path / f".{record.event_id}.part"
    assert part.read_bytes() == data[:held]  # a prefix to resume from
    with pytest.raises(AgentConnectionError):
        await download.done
