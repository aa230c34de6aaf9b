"""A read error on the agent that can pass (EMFILE, EIO) is not a lost file: the agent answers a
retryable `internal` error, not `file_unavailable`, and the controller collects the file later.

Real websockets on loopback; the fault is injected where the agent opens or reads the file.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

import edge.wsfiles
from controller.errors import RequestError
from controller.wsclient import AgentClient
from edge.messages.ws import ErrorCode
from tests.fixtures.ws_helpers import (
    DEVICE_ID,
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
from tests.test_controller_collector import rig, settings_for


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as made:
        yield made


class _FlakyOpen:
    """Stands in for `edge.wsfiles._open_event_file`: the first `opens_failing` opens raise
    `open_error`; the handle of the next one raises EIO on its read number `read_failing`."""

    def __init__(
        self, opens_failing: int = 0, read_failing: int | None = None, open_error: int = 0
    ) -> None:
        self.opens_failing = opens_failing
        self.open_error = open_error
        self.read_failing = read_failing
        self.real = edge.wsfiles._open_event_file
        self.opens = 0

    def __call__(self, path: Path, events_dir: Path, size: int, offset: int) -> IO[bytes]:
        self.opens += 1
        if self.opens_failing:
            self.opens_failing -= 1
            raise OSError(self.open_error, "injected", str(path))
        handle = self.real(path, events_dir, size, offset)
        if self.read_failing is None:
            return handle
        failing, self.read_failing = self.read_failing, None
        return _FailingReads(handle, failing)  # type: ignore[return-value]


class _FailingReads:
    """A file handle whose read number `failing` raises EIO (a flaky SD card)."""

    def __init__(self, handle: IO[bytes], failing: int) -> None:
        self._handle = handle
        self._failing = failing
        self._reads = 0

    def read(self, count: int) -> bytes:
        self._reads += 1
        if self._reads == self._failing:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return self._handle.read(count)

    def close(self) -> None:
        self._handle.close()


@pytest.mark.parametrize("open_error", [errno.EMFILE, errno.EIO, errno.EACCES])
async def test_a_file_that_cannot_be_opened_for_now_gets_a_retryable_error(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, open_error: int
) -> None:
    record = add_event(agent.store)
    assert record.file is not None
    monkeypatch.setattr(edge.wsfiles, "_open_event_file", _FlakyOpen(1, open_error=open_error))
    get = json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id})
    async with running(agent.server(ws_settings())) as server, raw_session(server) as ws:
        await ws.send(get)
        error = await recv_json(ws)
        assert (error["type"], error["code"], error["request_id"]) == ("error", "internal", "g")
        assert error["fatal"] is False
        # The same connection, asked again once the fault has passed, gets the whole file.
        await ws.send(get)
        start = await recv_json(ws)
        assert (start["type"], start["offset"]) == ("file_start", 0)
        data = b""
        async with asyncio.timeout(TIMEOUT_S):
            while isinstance(message := await ws.recv(), bytes):
                data += message
        assert json.loads(message)["type"] == "file_end"
        assert hashlib.sha256(data).hexdigest() == record.file.sha256


async def test_a_read_failing_mid_transfer_is_retried_and_resumed(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    record = add_event(agent.store, frames=100_000)  # 200 kB: several 64 KiB chunks
    assert record.file is not None
    # The second read of the transfer fails: one chunk has gone out (read on a worker thread,
    # which is where a plain read of the file happens).
    monkeypatch.setattr(edge.wsfiles, "_open_event_file", _FlakyOpen(read_failing=2))
    dest = tmp_path / "dest"
    dest.mkdir()
    settings = ws_settings(sendfile=False)
    async with (
        running(agent.server(settings)) as server,
        AgentClient(url_of(server), TOKEN, "pc-1", "pull") as client,
        asyncio.timeout(TIMEOUT_S),
    ):
        with pytest.raises(RequestError) as raised:
            await client.download(record.event_id, dest, record.file)
        assert raised.value.code == ErrorCode.INTERNAL
        assert server.stats.bytes_sent == settings.chunk_bytes  # a prefix, kept in the .part
        path = await client.download(record.event_id, dest, record.file)  # resumes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record.file.sha256
        assert server.stats.bytes_sent == record.file.size_bytes  # nothing was sent twice


@pytest.mark.system
async def test_the_collector_does_not_write_off_a_file_the_agent_could_not_read(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    record = add_event(agent.store)
    flaky = _FlakyOpen(1, open_error=errno.EMFILE)
    monkeypatch.setattr(edge.wsfiles, "_open_event_file", flaky)
    async with (
        running(agent.server(ws_settings())) as server,
        rig(settings_for(tmp_path), url_of(server)) as r,
    ):
        r.finished(record)
        await r.idle()
        assert flaky.opens == 2  # refused once, then sent
        assert r.state(record) == "archived"
        assert r.collector.stats.gone == 0
        assert r.db.done_seq(DEVICE_ID) == record.seq
    assert agent.store.is_collected(record.event_id)  # acked: the agent may let it go
