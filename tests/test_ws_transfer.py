"""Websocket listing, verified and resumable downloads, push, ack and retention, backpressure."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.errors import AgentConnectionError, RequestError, TransferError
from controller.wsclient import AgentClient, PushedFile
from edge.bus import EventFinished, EventStarted
from edge.messages.common import EventRecord
from edge.messages.ws import ErrorCode, EventNotice
from edge.settings import StorageSettings
from edge.wsserver import WsServer
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    TOKEN,
    Agent,
    add_event,
    listing,
    raw_session,
    recv_json,
    running,
    url_of,
    wait_until,
    ws_settings,
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as agent:
        yield agent


@pytest.fixture
async def server(agent: Agent) -> AsyncIterator[WsServer]:
    async with running(agent.server(ws_settings())) as server:
        yield server


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    directory.mkdir()
    return directory


def client(server: WsServer, mode: str = "pull", **kwargs: object) -> AgentClient:
    return AgentClient(url_of(server), TOKEN, "pc-1", mode, **kwargs)  # type: ignore[arg-type]


def stored_bytes(agent: Agent, record: EventRecord) -> bytes:
    path = agent.store.file_for(record.event_id)
    assert path is not None
    return path.read_bytes()


# -- listing --------------------------------------------------------------------------------------


async def test_list_pages_in_seq_order(agent: Agent, server: WsServer) -> None:
    records = [add_event(agent.store, frames=100) for _ in range(25)]
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        first = await session.list_page(since_seq=0, page_size=10)
        assert [r.seq for r in first.events] == [r.seq for r in records[:10]]
        assert first.more
        assert first.newest_seq == records[-1].seq
        last = await session.list_page(since_seq=records[19].seq, page_size=10)
        assert [r.event_id for r in last.events] == [r.event_id for r in records[20:]]
        assert not last.more
        listed = [r async for r in session.list_events(since_seq=0, page_size=10)]
        assert listed == records
        caught_up = [r async for r in session.list_events(since_seq=records[-3].seq, page_size=2)]
        assert caught_up == records[-2:]
        assert [r async for r in session.list_events(since_seq=records[-1].seq)] == []


# -- downloads ------------------------------------------------------------------------------------


async def test_download_several_files_checked_by_sha256(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    records = [add_event(agent.store, frames=n) for n in (10, 40_000, 100_000, 1)]
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        # Downloads and a listing in flight together: replies interleave with file chunks.
        results = await asyncio.gather(
            *(session.download(r.event_id, dest, r.file) for r in records),
            session.list_page(0, 100),
        )
    for record, path in zip(records, results[:-1], strict=True):
        assert isinstance(path, Path)
        assert record.file is not None
        assert path == dest / record.file.name
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == record.file.sha256
        assert data == stored_bytes(agent, record)
    assert listing(dest) == sorted(r.file.name for r in records if r.file)  # no .part left


async def test_download_to_an_explicit_path_without_expected(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store)
    target = dest / "copy.wav"
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        assert await session.download(record.event_id, target) == target
    assert target.read_bytes() == stored_bytes(agent, record)


async def test_transfer_cut_in_the_middle_resumes_from_the_partial_file(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store, frames=1_000_000)  # 2 MB in 64 KiB chunks
    assert record.file is not None
    size = record.file.size_bytes
    part = dest / f".{record.event_id}.part"
    async with raw_session(server) as ws:
        await ws.send(json.dumps({"type": "get", "request_id": "g1", "event_id": record.event_id}))
        start = await recv_json(ws)
        assert start["type"] == "file_start"
        assert start["file"]["size_bytes"] == size
        assert start["file"]["sha256"] == record.file.sha256
        with part.open("wb") as handle:
            for _ in range(5):
                async with asyncio.timeout(TIMEOUT_S):
                    chunk = await ws.recv()
                assert isinstance(chunk, bytes)
                handle.write(chunk)
        ws.transport.abort()  # the connection dies in mid-transfer
    partial = part.stat().st_size
    assert 0 < partial < size
    await wait_until(lambda: server.client_count == 0)
    sent_before = server.stats.bytes_sent
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        path = await session.download(record.event_id, dest, record.file)
    assert server.stats.bytes_sent - sent_before == size - partial  # only the rest was sent
    assert path.read_bytes() == stored_bytes(agent, record)
    assert not part.exists()


async def test_client_cut_in_mid_transfer_keeps_the_part_and_resumes(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store, frames=4_000_000)
    assert record.file is not None
    part = dest / f".{record.event_id}.part"
    session = client(server)
    await session.connect()
    download = asyncio.create_task(session.download(record.event_id, dest, record.file))
    await wait_until(lambda: part.exists() and part.stat().st_size > 0, interval_s=0.002)
    assert session._ws is not None
    session._ws.transport.abort()
    async with asyncio.timeout(TIMEOUT_S):
        (outcome,) = await asyncio.gather(download, return_exceptions=True)
    await session.close()
    final = dest / record.file.name
    # Almost always cut short; on a starved test loop the 8 MB may all have arrived first.
    if isinstance(outcome, AgentConnectionError):
        assert not final.exists()
        assert 0 < part.stat().st_size <= record.file.size_bytes
        async with client(server) as again, asyncio.timeout(TIMEOUT_S):
            await again.download(record.event_id, dest, record.file)
    else:
        assert outcome == final
    assert final.read_bytes() == stored_bytes(agent, record)
    assert not part.exists()


async def test_a_corrupt_partial_file_fails_verification_and_is_discarded(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store, frames=50_000)
    assert record.file is not None
    part = dest / f".{record.event_id}.part"
    part.write_bytes(b"\xff" * 1000)  # not a prefix of the file
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        with pytest.raises(TransferError, match="sha256"):
            await session.download(record.event_id, dest, record.file)
        assert not (dest / record.file.name).exists()
        assert not part.exists()
        # The next attempt starts from scratch and succeeds.
        path = await session.download(record.event_id, dest, record.file)
    assert path.read_bytes() == stored_bytes(agent, record)


async def test_a_partial_file_longer_than_the_file_is_restarted(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store, frames=100)
    assert record.file is not None
    (dest / f".{record.event_id}.part").write_bytes(b"\0" * (record.file.size_bytes + 10))
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        path = await session.download(record.event_id, dest, record.file)
    assert path.read_bytes() == stored_bytes(agent, record)


async def test_expected_file_that_differs_is_refused(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store)
    assert record.file is not None
    wrong = record.file.model_copy(update={"sha256": "0" * 64})
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        with pytest.raises(TransferError, match="differs"):
            await session.download(record.event_id, dest, wrong)
        # The session is still usable afterwards.
        assert await session.download(record.event_id, dest, record.file)
    assert listing(dest) == [record.file.name]


async def test_a_file_already_in_place_is_not_fetched_again(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store)
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        await session.download(record.event_id, dest, record.file)
        sent = server.stats.bytes_sent
        await session.download(record.event_id, dest, record.file)
    assert server.stats.bytes_sent == sent


async def test_unknown_gone_and_disallowed_downloads(
    agent: Agent, server: WsServer, dest: Path
) -> None:
    record = add_event(agent.store)
    gone = add_event(agent.store)
    path = agent.store.file_for(gone.event_id)
    assert path is not None
    path.unlink()
    async with client(server) as session, asyncio.timeout(TIMEOUT_S):
        with pytest.raises(RequestError) as raised:
            await session.download("0" * 32, dest)
        assert raised.value.code == ErrorCode.UNKNOWN_EVENT
        with pytest.raises(RequestError) as raised:
            await session.download(gone.event_id, dest)
        assert raised.value.code == ErrorCode.FILE_UNAVAILABLE
        await session.download(record.event_id, dest)  # still fine
    async with client(server, "off") as watcher, asyncio.timeout(TIMEOUT_S):
        with pytest.raises(RequestError) as raised:
            await watcher.download(record.event_id, dest)
        assert raised.value.code == ErrorCode.NOT_ALLOWED


# -- notifications and push ----------------------------------------------------------------------


async def next_of(session: AgentClient, kind: type) -> object:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            item = await session.next_notification()
            if isinstance(item, kind):
                return item


async def test_push_mode_delivers_new_files_and_every_mode_is_notified(
    agent: Agent, server: WsServer, tmp_path: Path
) -> None:
    old = add_event(agent.store)  # before the session: not pushed
    push_dir = tmp_path / "pushed"
    push_dir.mkdir()
    async with (
        client(server, "push", push_dir=push_dir) as pusher,
        client(server, "pull") as puller,
    ):
        new = add_event(agent.store, frames=30_000)
        agent.bus.publish(
            EventStarted(
                new.event_id, new.seq, new.onset_time, level_dbfs=-20.0, noise_floor_dbfs=-60.0
            )
        )
        agent.bus.publish(EventFinished(new))
        for session in (pusher, puller):
            started = await next_of(session, EventNotice)
            assert isinstance(started, EventNotice)
            assert (started.kind, started.event_id, started.record) == ("start", new.event_id, None)
            ended = await next_of(session, EventNotice)
            assert isinstance(ended, EventNotice)
            assert (ended.kind, ended.record) == ("end", new)
        pushed = await next_of(pusher, PushedFile)
        assert isinstance(pushed, PushedFile)
        assert new.file is not None
        assert (pushed.event_id, pushed.seq, pushed.file) == (new.event_id, new.seq, new.file)
        assert pushed.path == push_dir / new.file.name
        assert hashlib.sha256(pushed.path.read_bytes()).hexdigest() == new.file.sha256
        assert old.file is not None
        assert not (push_dir / old.file.name).exists()
        assert [p.name for p in push_dir.iterdir()] == [new.file.name]


async def test_a_client_behind_the_bus_resyncs_from_the_event_log(
    agent: Agent, server: WsServer
) -> None:
    async with client(server, "pull") as session:
        records = [add_event(agent.store, frames=10) for _ in range(150)]
        for record in records:  # all at once: the subscription queue (64) overflows
            agent.bus.publish(EventFinished(record))
        seen: list[int] = []
        async with asyncio.timeout(TIMEOUT_S):
            while len(seen) < len(records):
                item = await session.next_notification()
                assert isinstance(item, EventNotice)
                seen.append(item.seq)
    assert seen == [r.seq for r in records]  # all of them, in order, no duplicates


async def test_an_event_missing_from_the_bus_is_announced_from_the_log(
    agent: Agent, server: WsServer
) -> None:
    async with client(server, "pull") as session:
        silent = add_event(agent.store)  # reaches the log, never the bus
        loud = add_event(agent.store)
        agent.bus.publish(EventFinished(loud))
        seen = [await next_of(session, EventNotice) for _ in range(2)]
    assert [n.seq for n in seen if isinstance(n, EventNotice)] == [silent.seq, loud.seq]


async def test_push_skips_formats_the_client_does_not_accept(
    agent: Agent, server: WsServer, tmp_path: Path
) -> None:
    push_dir = tmp_path / "pushed"
    push_dir.mkdir()
    async with client(server, "push", push_dir=push_dir, formats=("flac",)) as session:
        wav = add_event(agent.store)
        flac = add_event(agent.store, file_format="flac")
        agent.bus.publish(EventFinished(wav))
        agent.bus.publish(EventFinished(flac))
        pushed = await next_of(session, PushedFile)
    # Pushes go in seq order, so the wav would have come first.
    assert isinstance(pushed, PushedFile)
    assert pushed.event_id == flac.event_id
    assert server.stats.files_sent == 1
    assert listing(push_dir) == [flac.file.name if flac.file else ""]


# -- ack and retention ---------------------------------------------------------------------------


async def test_ack_marks_collected_and_retention_deletes_collected_first(tmp_path: Path) -> None:
    # Four ~8 kB files; the soft limit holds about two, the hard limit all of them.
    storage = StorageSettings(max_disk_mb=0.02, hard_max_disk_mb=1.0, min_free_mb=0.0)
    with Agent(tmp_path / "data", storage) as agent:
        records = [add_event(agent.store, frames=4000) for _ in range(4)]
        async with (
            running(agent.server(ws_settings())) as server,
            client(server) as session,
            asyncio.timeout(TIMEOUT_S),
        ):
            await session.ack(records[1].event_id)
            await session.ack(records[2].event_id)
            await session.ack(records[2].event_id)  # idempotent
            with pytest.raises(RequestError) as raised:
                await session.ack("f" * 32)
            assert raised.value.code == ErrorCode.UNKNOWN_EVENT
        assert [agent.store.is_collected(r.event_id) for r in records] == [False, True, True, False]
        report = agent.store.enforce_retention()
        present = [agent.store.file_for(r.event_id) is not None for r in records]
        # Collected files went first; uncollected ones stay while under the hard limit.
        assert present == [True, False, False, True]
        assert (report.deleted_collected, report.deleted_uncollected) == (2, 0)


# -- backpressure ---------------------------------------------------------------------------------


async def test_a_stalled_client_does_not_make_the_agent_buffer(
    agent: Agent, server: WsServer
) -> None:
    record = add_event(agent.store, frames=16_000_000)  # 32 MB
    assert record.file is not None
    async with raw_session(server) as ws:
        ws.transport.pause_reading()  # the client stops reading
        await ws.send(json.dumps({"type": "get", "request_id": "g", "event_id": record.event_id}))
        # Wait until the agent has stopped sending (nothing moves for a while).
        last = -1
        async with asyncio.timeout(TIMEOUT_S * 3):
            while server.stats.bytes_sent != last or last <= 0:
                last = server.stats.bytes_sent
                await asyncio.sleep(0.3)
        session = next(iter(server._sessions))
        buffered = session.ws.transport.get_write_buffer_size()
        # What left the agent sits in the kernel's socket buffers; the agent itself holds at
        # most about one chunk above its write limit.
        assert server.stats.bytes_sent < record.file.size_bytes
        assert buffered <= 2 * server.settings.chunk_bytes + 1024
        ws.transport.resume_reading()
        received = 0
        async with asyncio.timeout(TIMEOUT_S * 3):
            assert (await recv_json(ws))["type"] == "file_start"
            while received < record.file.size_bytes:
                chunk = await ws.recv()
                assert isinstance(chunk, bytes)
                received += len(chunk)
            assert (await recv_json(ws))["type"] == "file_end"
