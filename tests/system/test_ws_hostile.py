"""Websocket input the other tests do not throw: replayed sessions and requests, frames cut
short at the TCP level, invalid UTF-8, and a flood of requests from a client that never reads.
(No auth, wrong tokens, traversal, malformed JSON, oversized frames and the fuzz run are in
test_ws_handshake.py, test_ws_safety.py and test_ws_fuzz.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edge.messages.ws import ErrorCode
from edge.wsserver import WsServer
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    TOKEN,
    Agent,
    add_event,
    hello,
    raw_session,
    recv_json,
    running,
    wait_until,
    ws_settings,
)

pytestmark = pytest.mark.system


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as agent:
        yield agent


@pytest.fixture
async def server(agent: Agent) -> AsyncIterator[WsServer]:
    async with running(agent.server(ws_settings())) as server:
        yield server


def frame(opcode: int, payload: bytes, fin: bool = True, declared: int | None = None) -> bytes:
    """A masked client frame; `declared` announces another length than the payload's."""
    length = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_socket(server: WsServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection upgraded by hand (so that broken frames can be sent), after hello."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        ).encode()
    )
    async with asyncio.timeout(TIMEOUT_S):
        response = await reader.readuntil(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101"), response[:80]
    writer.write(frame(0x1, hello().encode()))
    await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while await reader.read(65536):
            pass


async def still_serving(server: WsServer) -> None:
    async with raw_session(server) as ws:
        await ws.send(json.dumps({"type": "list", "request_id": "alive"}))
        reply = await recv_json(ws)
        assert (reply["type"], reply["request_id"]) == ("events", "alive")
    assert server.stats.internal_errors == 0


async def test_a_replayed_session_gets_the_same_answers_and_acks_once(
    agent: Agent, server: WsServer
) -> None:
    record = add_event(agent.store)
    requests = [
        json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id}),
        json.dumps({"type": "ack", "request_id": "a", "event_id": record.event_id}),
    ]
    transcripts = []
    for _ in range(2):  # the second run replays the first one's frames verbatim
        async with raw_session(server) as ws:
            seen = []
            for request in requests:
                await ws.send(request)
            async with asyncio.timeout(TIMEOUT_S):
                while not {"acked", "file_end"} <= set(seen):
                    message = await ws.recv()
                    seen.append(
                        "data" if isinstance(message, bytes) else json.loads(message)["type"]
                    )
            # A replayed hello inside a session is refused; the session goes on.
            await ws.send(hello())
            reply = await recv_json(ws)
            assert (reply["type"], reply.get("code")) == ("error", ErrorCode.NOT_ALLOWED), reply
            transcripts.append(sorted(seen))  # an ack may overtake the file_end
    assert transcripts[0] == transcripts[1]
    log = (agent.data_dir / "events.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["kind"] == "collected" for line in log) == 1
    await still_serving(server)


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(frame(0x1, b'{"type": "li', declared=5000), id="text-cut-short"),
        pytest.param(frame(0x2, b"\x00" * 10, declared=1 << 20), id="binary-cut-short"),
        pytest.param(frame(0x1, b'{"type": "list"', fin=False), id="fragment-never-finished"),
        pytest.param(frame(0x1, b"\x00"), id="one-byte-then-close"),
        pytest.param(frame(0x1, b"x")[:3], id="header-cut"),
    ],
)
async def test_frames_cut_short_by_a_closed_connection(server: WsServer, broken: bytes) -> None:
    _, writer = await raw_socket(server)
    writer.write(broken)
    await writer.drain()
    writer.close()
    await wait_until(lambda: server.client_count == 0)
    await still_serving(server)


async def test_invalid_utf8_in_a_text_frame_closes_that_connection_only(server: WsServer) -> None:
    reader, writer = await raw_socket(server)
    writer.write(frame(0x1, b'{"type": "list", "request_id": "\xc3"}'))
    await writer.drain()
    await closed_by_server(reader)  # 1007, as RFC 6455 requires
    writer.close()
    await still_serving(server)


async def test_a_flood_of_requests_from_a_client_that_never_reads(
    agent: Agent, server: WsServer
) -> None:
    for _ in range(5):
        add_event(agent.store)
    _, writer = await raw_socket(server)
    # 20 000 requests, none of the answers read: the agent must stop reading this client
    # (backpressure) rather than queue answers without bound.
    request = frame(0x1, json.dumps({"type": "list", "request_id": "f" * 60}).encode())
    transport = writer.transport
    for sent in range(1, 20_001):
        writer.write(request)
        if transport.get_write_buffer_size() > 4 * 1024 * 1024:
            break  # the agent no longer takes them: the flood is held at the client
        if sent % 500 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(1.0)  # the agent works through what it has taken
    session = next(iter(server._sessions))
    assert session.ws.transport.get_write_buffer_size() <= 2 * server.settings.chunk_bytes + 1024
    writer.transport.abort()
    await wait_until(lambda: server.client_count == 0)
    await still_serving(server)
