"""Connections that have not authenticated cannot take the slots of controllers: they have slots
of their own (`MAX_UNAUTHENTICATED_CONNECTIONS`) and count toward max_clients only once their
hello carries the right token. Real websockets on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect

from controller.errors import HandshakeError
from controller.wsclient import AgentClient
from edge.messages.ws import CloseCode, ErrorCode
from edge.wsserver import MAX_UNAUTHENTICATED_CONNECTIONS, WsServer
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    TOKEN,
    Agent,
    add_event,
    recv_json,
    running,
    url_of,
    wait_closed,
    wait_until,
    ws_settings,
)

# Idle connections must outlive the test's steps, even on a loaded machine.
HELLO_TIMEOUT_S = 120.0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as made:
        yield made


@contextlib.asynccontextmanager
async def idle_strangers(server: WsServer, count: int) -> AsyncIterator[list[ClientConnection]]:
    """`count` connections without a token that never say hello, all upgraded and held."""
    async with contextlib.AsyncExitStack() as stack:
        held = [
            await stack.enter_async_context(
                connect(url_of(server), proxy=None, open_timeout=TIMEOUT_S)
            )
            for _ in range(count)
        ]
        await wait_until(lambda: server.client_count == count)
        yield held


async def test_idle_unauthenticated_connections_do_not_lock_out_a_controller(
    agent: Agent,
) -> None:
    record = add_event(agent.store)
    settings = ws_settings(hello_timeout_s=HELLO_TIMEOUT_S)  # max_clients: the default, 4
    assert settings.max_clients <= MAX_UNAUTHENTICATED_CONNECTIONS  # the attack of the review
    async with (
        running(agent.server(settings)) as server,
        idle_strangers(server, MAX_UNAUTHENTICATED_CONNECTIONS) as strangers,
        asyncio.timeout(TIMEOUT_S),
    ):
        async with AgentClient(url_of(server), TOKEN, "pc-1", "pull") as client:
            listed = [r.event_id async for r in client.list_events()]
            assert listed == [record.event_id]
            # One more stranger finds the slots for strangers taken.
            async with connect(url_of(server), proxy=None) as extra:
                error = await recv_json(extra)
                assert (error["code"], error["fatal"]) == (ErrorCode.TOO_MANY_CLIENTS, True)
                assert "Authorization" in error["message"]
                assert await wait_closed(extra) == CloseCode.TRY_AGAIN_LATER
        # The strangers were left alone (their hello timeout is what ends them).
        assert all(ws.close_code is None for ws in strangers)
        assert server.unauthenticated_count == MAX_UNAUTHENTICATED_CONNECTIONS


async def test_a_client_with_the_token_in_hello_counts_once_authenticated(agent: Agent) -> None:
    settings = ws_settings(max_clients=1, hello_timeout_s=HELLO_TIMEOUT_S)
    async with (
        running(agent.server(settings)) as server,
        idle_strangers(server, 1),
        asyncio.timeout(TIMEOUT_S),
    ):
        # The stranger does not hold the one slot: a client whose hello has the token gets it.
        async with AgentClient(url_of(server), TOKEN, "pc-1", "off", token_in_header=False):
            assert server.unauthenticated_count == 1
            # Now the slot is taken, and a second such client is refused after its hello.
            with pytest.raises(HandshakeError, match="at most 1") as raised:
                async with AgentClient(url_of(server), TOKEN, "pc-2", "off", token_in_header=False):
                    pass
            assert raised.value.code == ErrorCode.TOO_MANY_CLIENTS
            assert raised.value.close_code == CloseCode.TRY_AGAIN_LATER
            # A controller that sends the token in the header is held to max_clients too.
            with pytest.raises(HandshakeError, match="at most 1"):
                async with AgentClient(url_of(server), TOKEN, "pc-3", "off"):
                    pass
        await wait_until(lambda: server.client_count == 1)  # the stranger, still waiting
