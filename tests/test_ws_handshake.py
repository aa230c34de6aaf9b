"""Websocket handshake: token, version, hello timeout, client limit, health check, stop."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from controller.errors import AgentConnectionError, AuthenticationError, HandshakeError
from controller.wsclient import AgentClient
from edge.messages.ws import PROTOCOL_VERSION, CloseCode, ErrorCode
from tests.fixtures.ws_helpers import (
    DEVICE_ID,
    TIMEOUT_S,
    TOKEN,
    Agent,
    add_event,
    auth_headers,
    hello,
    raw_session,
    recv_json,
    running,
    url_of,
    wait_closed,
    wait_until,
    ws_settings,
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as agent:
        yield agent


async def test_welcome_reports_device_settings_and_newest_seq(agent: Agent) -> None:
    records = [add_event(agent.store) for _ in range(3)]
    async with (
        running(agent.server(ws_settings())) as server,
        AgentClient(url_of(server), TOKEN, "pc-1", "pull") as client,
    ):
        welcome = client.welcome
        assert welcome.device_id == DEVICE_ID
        assert welcome.protocol == PROTOCOL_VERSION
        assert welcome.newest_seq == records[-1].seq
        assert {"list", "get", "resume", "ack", "push"} <= set(welcome.capabilities)
        assert welcome.config.download_mode == "pull"
        assert welcome.chunk_bytes == 64 * 1024
        assert welcome.settings["device_id"] == DEVICE_ID
        # Secrets are masked: the token never travels back.
        assert welcome.settings["ws"]["token"] == "**********"
        assert TOKEN not in json.dumps(welcome.settings)


async def test_token_in_hello_instead_of_header(agent: Agent) -> None:
    async with (
        running(agent.server(ws_settings())) as server,
        AgentClient(url_of(server), TOKEN, "pc-1", "off", token_in_header=False) as client,
    ):
        assert client.welcome.device_id == DEVICE_ID


async def test_wrong_token_in_header_is_refused_before_the_upgrade(agent: Agent) -> None:
    async with running(agent.server(ws_settings())) as server:
        with pytest.raises(InvalidStatus) as raised:
            async with connect(
                url_of(server), additional_headers=auth_headers("wrong"), proxy=None
            ):
                pass
        assert raised.value.response.status_code == 401
        assert b"wrong websocket token" in raised.value.response.body
        with pytest.raises(AuthenticationError, match="HTTP 401"):
            async with AgentClient(url_of(server), "wrong", "pc-1", "pull"):
                pass
        assert server.stats.refused == 2


async def test_wrong_token_in_hello_gets_an_error_then_close_4001(agent: Agent) -> None:
    async with (
        running(agent.server(ws_settings())) as server,
        connect(url_of(server), proxy=None) as ws,
    ):
        await ws.send(hello(token="wrong"))
        error = await recv_json(ws)
        assert error["type"] == "error"
        assert error["code"] == ErrorCode.UNAUTHORIZED
        assert error["fatal"] is True
        assert await wait_closed(ws) == CloseCode.UNAUTHORIZED


async def test_client_library_reports_a_refused_hello_token(agent: Agent) -> None:
    async with running(agent.server(ws_settings())) as server:
        with pytest.raises(AuthenticationError, match="wrong token") as raised:
            async with AgentClient(url_of(server), "nope", "pc-1", "pull", token_in_header=False):
                pass
        assert raised.value.close_code == CloseCode.UNAUTHORIZED
        assert raised.value.code == ErrorCode.UNAUTHORIZED


async def test_no_token_configured_refuses_everyone(agent: Agent) -> None:
    async with running(agent.server(ws_settings(token=None))) as server:
        with pytest.raises(AuthenticationError, match="SOUNDEDGE_WS__TOKEN"):
            async with AgentClient(url_of(server), TOKEN, "pc-1", "pull"):
                pass


async def test_wrong_protocol_version_closes_4002(agent: Agent) -> None:
    async with (
        running(agent.server(ws_settings())) as server,
        connect(url_of(server), additional_headers=auth_headers(), proxy=None) as ws,
    ):
        await ws.send(hello(protocol=99))
        error = await recv_json(ws)
        assert error["code"] == ErrorCode.UNSUPPORTED_VERSION
        assert "99" in error["message"]
        assert "speaks 1" in error["message"]
        assert await wait_closed(ws) == CloseCode.UNSUPPORTED_VERSION


async def test_no_hello_in_time_closes_4003(agent: Agent) -> None:
    async with (
        running(agent.server(ws_settings(hello_timeout_s=0.2))) as server,
        connect(url_of(server), additional_headers=auth_headers(), proxy=None) as ws,
    ):
        error = await recv_json(ws)
        assert error["code"] == ErrorCode.HELLO_TIMEOUT
        assert await wait_closed(ws) == CloseCode.HELLO_TIMEOUT


@pytest.mark.parametrize(
    "first",
    [
        '{"type": "list", "request_id": "1"}',
        "not json",
        "[1, 2]",
        b"\x00\x01binary",
    ],
)
async def test_first_message_not_hello_closes_4004(agent: Agent, first: str | bytes) -> None:
    async with (
        running(agent.server(ws_settings())) as server,
        connect(url_of(server), additional_headers=auth_headers(), proxy=None) as ws,
    ):
        await ws.send(first)
        error = await recv_json(ws)
        assert error["code"] == ErrorCode.HELLO_REQUIRED
        assert await wait_closed(ws) == CloseCode.HANDSHAKE_FAILED


async def test_invalid_hello_names_the_field(agent: Agent) -> None:
    async with (
        running(agent.server(ws_settings())) as server,
        connect(url_of(server), additional_headers=auth_headers(), proxy=None) as ws,
    ):
        await ws.send(hello(mode="sometimes"))
        error = await recv_json(ws)
        assert error["code"] == ErrorCode.INVALID_MESSAGE
        assert "download_mode" in error["message"]
        assert await wait_closed(ws) == CloseCode.HANDSHAKE_FAILED


async def test_client_library_reports_version_and_timeout_failures(agent: Agent) -> None:
    async with running(agent.server(ws_settings(max_clients=1))) as server:
        async with AgentClient(url_of(server), TOKEN, "pc-1", "off"):
            with pytest.raises(HandshakeError, match="at most 1") as raised:
                async with AgentClient(url_of(server), TOKEN, "pc-2", "off"):
                    pass
            assert raised.value.code == ErrorCode.TOO_MANY_CLIENTS
            assert raised.value.close_code == CloseCode.TRY_AGAIN_LATER
        # The slot is free again once the first client has gone.
        await wait_until(lambda: server.client_count == 0)
        async with AgentClient(url_of(server), TOKEN, "pc-3", "off") as client:
            assert client.welcome.device_id == DEVICE_ID


async def test_health_check_answers_without_a_token(agent: Agent) -> None:
    async with running(agent.server(ws_settings())) as server:

        def fetch() -> tuple[int, bytes]:
            url = f"http://127.0.0.1:{server.port}/healthz"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=TIMEOUT_S) as response:
                return response.status, response.read()

        status, body = await asyncio.to_thread(fetch)
        assert (status, body) == (200, b"ok\n")


async def test_stop_closes_clients_with_1001(agent: Agent) -> None:
    server = agent.server(ws_settings())
    async with running(server):
        client = AgentClient(url_of(server), TOKEN, "pc-1", "off")
        await client.connect()
    # running() set stop and waited for run() to return.
    assert server.client_count == 0
    with pytest.raises(AgentConnectionError, match="1001"):
        async with asyncio.timeout(TIMEOUT_S):
            await client.next_notification()
    assert client._ws is not None
    assert client._ws.close_code == CloseCode.GOING_AWAY
    await client.close()


async def test_stop_during_a_stalled_transfer_returns(agent: Agent) -> None:
    record = add_event(agent.store, frames=8_000_000)  # 16 MB, more than the socket buffers
    server = agent.server(ws_settings(ping_timeout_s=0.5))
    stop = asyncio.Event()
    run = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.started.wait(), TIMEOUT_S)
    async with raw_session(server) as ws:
        ws.transport.pause_reading()  # the client stalls in mid-transfer
        await ws.send(json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id}))
        await wait_until(lambda: server.stats.bytes_sent > 0)
        stop.set()
        await asyncio.wait_for(run, TIMEOUT_S)  # returns although the client never reads
        assert server.client_count == 0
        ws.transport.abort()


async def test_a_client_that_stops_reading_is_dropped(agent: Agent) -> None:
    record = add_event(agent.store, frames=8_000_000)  # 16 MB, more than the socket buffers
    server = agent.server(ws_settings(ping_interval_s=0.2, ping_timeout_s=0.3))
    async with running(server), raw_session(server) as ws:
        ws.transport.pause_reading()  # connected, but takes nothing
        await ws.send(json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id}))
        await wait_until(lambda: server.client_count == 0)
        assert server.stats.bytes_sent < (record.file.size_bytes if record.file else 0)
        ws.transport.abort()


async def test_vanished_client_is_dropped_by_keepalive(agent: Agent) -> None:
    settings = ws_settings(ping_interval_s=0.1, ping_timeout_s=0.3)
    async with running(agent.server(settings)) as server:
        client = AgentClient(url_of(server), TOKEN, "pc-1", "off", ping_interval_s=None)
        await client.connect()
        assert server.client_count == 1
        # Stop reading the socket: pings go unanswered, as with a client that lost power.
        assert client._ws is not None
        client._ws.transport.pause_reading()
        await wait_until(lambda: server.client_count == 0)
        client._ws.transport.abort()
        await client.close()
