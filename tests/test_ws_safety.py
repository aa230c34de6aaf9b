"""Websocket safety: no path reaches the file system, bad frames get errors, limits hold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from edge.messages.ws import (
    MAX_CONTROL_MESSAGE_BYTES,
    MAX_FRAME_BYTES,
    CloseCode,
    ErrorCode,
)
from edge.wsserver import WsServer
from edge.wssession import PENDING_TRANSFERS
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    Agent,
    add_event,
    raw_session,
    recv_json,
    running,
    wait_closed,
    ws_settings,
)

SECRET = b"TOP-SECRET-CONTENT-OUTSIDE-THE-EVENT-DIRECTORY"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    (tmp_path / "secret.wav").write_bytes(SECRET)
    with Agent(tmp_path / "data") as agent:
        yield agent


@pytest.fixture
async def server(agent: Agent) -> AsyncIterator[WsServer]:
    async with running(agent.server(ws_settings())) as server:
        yield server


async def reply_to(ws: ClientConnection, message: str | bytes) -> dict[str, Any]:
    await ws.send(message)
    return await recv_json(ws)


async def still_alive(ws: ClientConnection) -> None:
    reply = await reply_to(ws, json.dumps({"type": "list", "request_id": "alive"}))
    assert (reply["type"], reply["request_id"]) == ("events", "alive")


TRAVERSALS = [
    "../../secret.wav",
    "../secret.wav",
    "/etc/passwd",
    "..",
    "..%2F..%2Fsecret.wav",
    "C:\\Windows\\win.ini",
    "0123456789abcdef0123456789abcde/",
    "0123456789ABCDEF0123456789ABCDEF",  # upper case is not an event id either
    "0123456789abcdef0123456789abcdef\n",
    "0123456789abcdef0123456789abcdef/../../secret.wav",
    "",
]


@pytest.mark.parametrize("event_id", TRAVERSALS)
async def test_paths_instead_of_event_ids_are_refused(server: WsServer, event_id: str) -> None:
    async with raw_session(server) as ws:
        for kind in ("get", "ack"):
            request = {"type": kind, "request_id": "r1", "event_id": event_id}
            reply = await reply_to(ws, json.dumps(request))
            assert reply["type"] == "error"
            assert reply["code"] == ErrorCode.INVALID_MESSAGE
            assert reply["request_id"] == "r1"
            assert "event_id" in reply["message"]
        await still_alive(ws)
    assert server.stats.files_sent == 0


async def test_a_symlink_out_of_the_event_directory_is_not_followed(
    agent: Agent, server: WsServer, tmp_path: Path
) -> None:
    record = add_event(agent.store)
    path = agent.store.file_for(record.event_id)
    assert path is not None
    path.unlink()
    path.symlink_to(tmp_path / "secret.wav")
    async with raw_session(server) as ws:
        reply = await reply_to(
            ws, json.dumps({"type": "get", "request_id": "s", "event_id": record.event_id})
        )
        assert (reply["type"], reply["code"]) == ("error", ErrorCode.FILE_UNAVAILABLE)
        await still_alive(ws)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", ErrorCode.MALFORMED_JSON),
        ("[" * 5000 + "]" * 5000, ErrorCode.MALFORMED_JSON),  # deeper than the parser allows
        ("42", ErrorCode.INVALID_MESSAGE),
        ('"list"', ErrorCode.INVALID_MESSAGE),
        ('{"request_id": "x"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "rm -rf", "request_id": "x"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": 7}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "list", "request_id": "x", "page_size": 0}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "list", "request_id": "x", "since_seq": -1}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "list", "request_id": "x", "path": "/etc"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "list"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "get", "request_id": "x", "event_id": 5}', ErrorCode.INVALID_MESSAGE),
        (
            '{"type": "get", "request_id": "x", "event_id": "' + "a" * 32 + '", "offset": -5}',
            ErrorCode.INVALID_MESSAGE,
        ),
        (
            json.dumps(
                {
                    "type": "hello",
                    "protocol": 1,
                    "client_id": "x",
                    "config": {"download_mode": "off"},
                }
            ),
            ErrorCode.NOT_ALLOWED,
        ),
        (b"\x00\xff binary", ErrorCode.BINARY_NOT_ACCEPTED),
        (
            '{"type": "list", "pad": "' + "x" * MAX_CONTROL_MESSAGE_BYTES + '"}',
            ErrorCode.MESSAGE_TOO_LARGE,
        ),
    ],
)
async def test_malformed_messages_get_an_error_and_the_connection_survives(
    server: WsServer, frame: str | bytes, code: ErrorCode
) -> None:
    async with raw_session(server) as ws:
        reply = await reply_to(ws, frame)
        assert reply["type"] == "error"
        assert reply["code"] == code
        assert reply["fatal"] is False
        assert len(reply["message"]) < 400  # short, and the input is not echoed back
        await still_alive(ws)
    assert server.stats.internal_errors == 0


async def test_an_oversized_frame_closes_with_1009(server: WsServer) -> None:
    async with raw_session(server) as ws:
        await ws.send("x" * (MAX_FRAME_BYTES + 1))
        assert await wait_closed(ws) == CloseCode.MESSAGE_TOO_BIG
    # The server itself carries on.
    async with raw_session(server) as ws:
        await still_alive(ws)


async def test_too_many_pending_gets_are_refused(agent: Agent, server: WsServer) -> None:
    big = add_event(agent.store, frames=8_000_000)  # 16 MB: more than the socket buffers
    async with raw_session(server) as ws:
        ws.transport.pause_reading()  # the first transfer stalls, the rest must queue
        requests = PENDING_TRANSFERS + 4
        for n in range(requests):
            await ws.send(
                json.dumps({"type": "get", "request_id": f"g{n}", "event_id": big.event_id})
            )
        ws.transport.resume_reading()
        refused = 0
        ended = 0
        async with asyncio.timeout(TIMEOUT_S * 3):
            while ended + refused < requests:
                message = await ws.recv()
                if isinstance(message, bytes):
                    continue
                data = json.loads(message)
                if data["type"] == "file_end":
                    ended += 1
                elif data["type"] == "error":
                    assert data["code"] == ErrorCode.TOO_MANY_REQUESTS
                    refused += 1
        assert refused >= 1
        assert ended >= PENDING_TRANSFERS
