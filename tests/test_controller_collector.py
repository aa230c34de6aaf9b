"""The collector against a real agent websocket server (real store, real files, loopback):
dedup, gaps and catch-up, bad cases (checksum, unreachable agent, full archive disk), and the
catch-up retried when the websocket comes back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.archive import Archive
from controller.collector import Collector
from controller.db import Database
from controller.settings import ControllerSettings
from edge.messages.common import EventRecord
from edge.wsserver import WsServer
from tests.fixtures.broker import free_port
from tests.fixtures.ws_helpers import (
    DEVICE_ID,
    TOKEN,
    Agent,
    add_event,
    running,
    url_of,
    wait_until,
    ws_settings,
)

pytestmark = pytest.mark.system  # real websocket servers on loopback (in-process, fast)

TIMEOUT_S = 30.0


def settings_for(tmp_path: Path, **collector: Any) -> ControllerSettings:
    values: dict[str, Any] = {
        "retry_min_s": 0.05,
        "retry_max_s": 0.2,
        "max_attempts": 3,
        "catchup_interval_s": 0,
        "min_free_mb": 0,
    }
    values.update(collector)
    return ControllerSettings(
        controller_id="ctl-test",
        archive_dir=tmp_path / "archive",
        ws_token=TOKEN,
        collector=values,
    )


class Rig:
    """A collector with its database and archive, pointed at one agent URL."""

    def __init__(self, settings: ControllerSettings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.db = Database(settings.database_path)
        self.db.open()
        self.archive = Archive(
            settings.archive_dir,
            settings.controller_id,
            int(settings.collector.min_free_mb * 1e6),
            settings.collector.claim_timeout_s,
        )
        self.archive.open()
        self.collector = Collector(settings, self.db, self.archive, lambda _: self.url)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def finished(self, record: EventRecord) -> None:
        """As the fleet does for an `end` message."""
        self.collector.event_finished(record, self.db.record_end(record))

    async def idle(self) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            await self.collector.wait_idle()

    async def catch_up(self) -> int:
        async with asyncio.timeout(TIMEOUT_S):
            return await self.collector.catch_up(DEVICE_ID)

    def state(self, record: EventRecord) -> str:
        row = self.db.event(record.event_id)
        assert row is not None
        return row.state


@contextlib.asynccontextmanager
async def rig(settings: ControllerSettings, url: str) -> AsyncIterator[Rig]:
    made = Rig(settings, url)
    await made.collector.start()
    made.task = asyncio.create_task(made.collector.run(made.stop))
    try:
        yield made
    finally:
        made.stop.set()
        async with asyncio.timeout(TIMEOUT_S):
            await made.task
        made.db.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "agent") as made:
        yield made


@pytest.fixture
async def server(agent: Agent) -> AsyncIterator[WsServer]:
    async with running(agent.server(ws_settings())) as started:
        yield started


def archived_files(archive: Path) -> list[Path]:
    """Everything under <archive>/<device>/<day>/, hidden partial files included."""
    return sorted(p for p in archive.glob("*/*/*") if ".claims" not in p.parts)


async def test_a_finished_event_is_archived_with_a_sidecar_and_acked(
    tmp_path: Path, agent: Agent, server: WsServer
) -> None:
    record = add_event(agent.store)
    async with rig(settings_for(tmp_path), url_of(server)) as r:
        r.finished(record)
        await r.idle()
        assert r.state(record) == "archived"
        row = r.db.event(record.event_id)
        assert row is not None
        assert row.acked
    assert record.file is not None
    path = tmp_path / "archive" / DEVICE_ID / "2026-11-25" / record.file.name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record.file.sha256
    assert archived_files(tmp_path / "archive") == [path, path.with_name(path.name + ".json")]
    assert agent.store.is_collected(record.event_id)


async def test_the_same_event_announced_twice_is_downloaded_once(
    tmp_path: Path, agent: Agent, server: WsServer
) -> None:
    record = add_event(agent.store)
    async with rig(settings_for(tmp_path), url_of(server)) as r:
        r.finished(record)
        r.finished(record)
        await r.idle()
        r.finished(record)  # again once archived: the database knows
        await r.catch_up()
        await r.idle()
        assert r.collector.stats.archived == 1
        assert r.collector.stats.already_archived == 0


async def test_a_seq_gap_triggers_a_catch_up_of_the_missed_events(
    tmp_path: Path, agent: Agent, server: WsServer
) -> None:
    records = [add_event(agent.store) for _ in range(4)]
    async with rig(settings_for(tmp_path), url_of(server)) as r:
        r.finished(records[0])
        await r.idle()
        r.finished(records[3])  # 2 and 3 were missed
        await r.idle()
        assert [r.state(rec) for rec in records] == ["archived"] * 4
        assert r.collector.stats.gaps == 1
        assert r.db.done_seq(DEVICE_ID) == 4


async def test_catch_up_skips_seqs_the_agent_does_not_have(
    tmp_path: Path, agent: Agent, server: WsServer
) -> None:
    first = add_event(agent.store)
    agent.store.reserve_seq()  # seq 2 never finished (e.g. lost in a crash)
    third = add_event(agent.store)
    async with rig(settings_for(tmp_path), url_of(server)) as r:
        assert await r.catch_up() == 2
        await r.idle()
        assert [r.state(first), r.state(third)] == ["archived", "archived"]
        assert r.db.done_seq(DEVICE_ID) == third.seq


async def test_a_file_that_fails_its_checksum_is_retried_and_never_archived(
    tmp_path: Path, agent: Agent, server: WsServer, caplog: pytest.LogCaptureFixture
) -> None:
    record = add_event(agent.store)
    path = agent.store.path_of(record)
    original = path.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(corrupted))
    caplog.set_level(logging.WARNING)
    async with rig(settings_for(tmp_path), url_of(server)) as r:
        r.finished(record)
        await r.idle()
        assert r.state(record) == "failed"
        row = r.db.event(record.event_id)
        assert row is not None
        assert row.attempts == 3
        assert "sha256" in (row.last_error or "")
        assert archived_files(tmp_path / "archive") == []
        assert not agent.store.is_collected(record.event_id)
        assert "giving up" in caplog.text

        # Repaired on the agent: the next catch-up collects it.
        path.write_bytes(original)
        await r.catch_up()
        await r.idle()
        assert r.state(record) == "archived"


async def test_an_unreachable_agent_is_retried_and_the_rest_goes_on(
    tmp_path: Path, agent: Agent, server: WsServer, caplog: pytest.LogCaptureFixture
) -> None:
    record = add_event(agent.store)
    dead_url = f"ws://127.0.0.1:{free_port()}"
    caplog.set_level(logging.WARNING)
    settings = settings_for(tmp_path)
    async with rig(settings, dead_url) as r:
        r.finished(record)
        await r.idle()
        assert r.state(record) == "failed"
        assert "cannot connect" in caplog.text
        assert archived_files(tmp_path / "archive") == []
        r.url = url_of(server)  # the agent announces a working URL again
        await r.catch_up()
        await r.idle()
        assert r.state(record) == "archived"


async def test_a_full_archive_disk_writes_nothing_and_says_so(
    tmp_path: Path, agent: Agent, server: WsServer, caplog: pytest.LogCaptureFixture
) -> None:
    record = add_event(agent.store)
    caplog.set_level(logging.WARNING)
    # More free space wanted than any disk has: the archive is "full".
    async with rig(settings_for(tmp_path, min_free_mb=1e12), url_of(server)) as r:
        r.finished(record)
        await r.idle()
        assert r.state(record) == "failed"
        assert "archive disk full" in caplog.text
        assert "SOUNDEDGE_CONTROLLER_COLLECTOR__MIN_FREE_MB" in caplog.text
    assert archived_files(tmp_path / "archive") == []


async def test_unfinished_work_resumes_after_a_restart(
    tmp_path: Path, agent: Agent, server: WsServer
) -> None:
    record = add_event(agent.store)
    settings = settings_for(tmp_path)
    db = Database(settings.database_path)
    db.open()
    db.record_end(record)  # seen, then the controller stopped before downloading
    db.close()
    async with rig(settings, url_of(server)) as r:
        await r.idle()
        assert r.state(record) == "archived"


async def test_a_refused_token_is_reported_with_the_setting_to_fix(
    tmp_path: Path, agent: Agent, server: WsServer, caplog: pytest.LogCaptureFixture
) -> None:
    record = add_event(agent.store)
    settings = ControllerSettings(
        controller_id="ctl-test",
        archive_dir=tmp_path / "archive",
        ws_tokens={DEVICE_ID: "not-the-token"},
        collector=settings_for(tmp_path).collector,
    )
    caplog.set_level(logging.WARNING)
    async with rig(settings, url_of(server)) as r:
        r.finished(record)
        await r.idle()
        assert r.state(record) == "failed"
    assert "401" in caplog.text
    assert "SOUNDEDGE_CONTROLLER_WS_TOKEN" in caplog.text


async def test_two_collectors_sharing_an_archive_download_each_file_once(
    tmp_path: Path, agent: Agent, server: WsServer
) -> None:
    records = [add_event(agent.store) for _ in range(12)]
    base = settings_for(tmp_path, max_attempts=50)
    group = {"mqtt": {"shared_group": "g"}}
    one = ControllerSettings(**(base.model_dump() | {"controller_id": "one", **group}))
    two = ControllerSettings(
        **(base.model_dump() | {"controller_id": "two", "db_path": tmp_path / "two.db", **group})
    )
    async with rig(one, url_of(server)) as a, rig(two, url_of(server)) as b:
        # Both catch up the same history at the same time, as a group does at start.
        await asyncio.gather(a.catch_up(), b.catch_up())
        await asyncio.gather(a.idle(), b.idle())
        downloads = a.collector.stats.archived + b.collector.stats.archived
        assert downloads == len(records), (a.collector.stats, b.collector.stats)
        assert {a.state(r) for r in records} == {"archived"}
        assert {b.state(r) for r in records} == {"archived"}


async def test_an_agent_answering_as_another_device_is_not_trusted(
    tmp_path: Path, agent: Agent, server: WsServer, caplog: pytest.LogCaptureFixture
) -> None:
    record = add_event(agent.store)
    impostor = record.model_copy(update={"device_id": "pi2"})  # pi2's URL points to pi1
    caplog.set_level(logging.WARNING)
    async with rig(settings_for(tmp_path), url_of(server)) as r:
        r.finished(impostor)
        await r.idle()
        assert r.state(impostor) == "failed"
    assert "answers as device 'pi1', not 'pi2'" in caplog.text
    assert archived_files(tmp_path / "archive") == []


# -- the websocket comes back -------------------------------------------------------------------


class BrokenWsServer:
    """A TCP server on loopback that accepts each websocket connection and closes it at once
    (an agent whose websocket server is broken), noting when each connection arrived."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> BrokenWsServer:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        async with asyncio.timeout(TIMEOUT_S):
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def _accepted(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.arrivals.append(asyncio.get_running_loop().time())
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def backoff_floor_s(failures: int, min_s: float, max_s: float) -> float:
    """The shortest wait after `failures` failures in a row: backoff_delay's jitter never goes
    below half of the capped exponential step."""
    return min(max_s, min_s * 2.0 ** (failures - 1)) / 2.0


async def test_a_file_given_up_while_the_websocket_was_down_comes_when_it_is_back(
    tmp_path: Path, agent: Agent
) -> None:
    record = add_event(agent.store)
    port = free_port()  # nothing listens yet: connections are refused
    # The periodic catch-up is far away: only the retry of the failed catch-up can be in time.
    settings = settings_for(
        tmp_path, catchup_interval_s=600, retry_min_s=0.05, retry_max_s=0.5, max_attempts=2
    )
    async with rig(settings, f"ws://127.0.0.1:{port}") as r:
        r.finished(record)
        await wait_until(lambda: r.state(record) == "failed")
        # The catch-ups after it fail too while nothing listens, and go on failing.
        await wait_until(lambda: r.collector.stats.catch_ups >= 2)
        async with running(agent.server(ws_settings(port=port))):
            await wait_until(lambda: r.state(record) == "archived")
        assert r.collector.stats.given_up >= 1
        assert r.collector.stats.catch_up_retries >= 1
    assert agent.store.is_collected(record.event_id)


async def test_a_device_that_stays_down_is_retried_only_as_often_as_the_backoff_allows(
    tmp_path: Path, agent: Agent
) -> None:
    record = add_event(agent.store)
    min_s, max_s = 0.2, 1.0
    settings = settings_for(
        tmp_path, catchup_interval_s=600, retry_min_s=min_s, retry_max_s=max_s, max_attempts=1
    )
    async with BrokenWsServer() as broken, rig(settings, broken.url) as r:
        r.finished(record)
        # The download gives up at its first attempt; the catch-ups after it keep trying.
        await wait_until(lambda: len(broken.arrivals) >= 7)
        # Every connection waits out the backoff of the failures before it (the catch-up's
        # own and its link's): a slow machine only makes the gaps longer. The millisecond
        # allows for the event loop running timers up to its clock resolution early.
        first = broken.arrivals[0]
        floor = 0.0
        for failures, arrival in enumerate(broken.arrivals[1:], start=1):
            floor += backoff_floor_s(failures, min_s, max_s)
            assert arrival - first >= floor - 1e-3, (failures, broken.arrivals)
        assert r.state(record) == "failed"

        # Reported offline: no more tries (at most the one already under way).
        r.collector.device_online(DEVICE_ID, online=False)
        seen = len(broken.arrivals)
        await asyncio.sleep(3 * max_s)  # several capped backoffs: retries would show here
        assert len(broken.arrivals) <= seen + 1, broken.arrivals


async def test_a_device_coming_online_is_caught_up_at_once_despite_a_long_backoff(
    tmp_path: Path, agent: Agent
) -> None:
    record = add_event(agent.store)
    port = free_port()
    # After one refused connection every backoff (catch-up, link, download) is minutes long.
    settings = settings_for(
        tmp_path, catchup_interval_s=600, retry_min_s=300, retry_max_s=600, max_attempts=1
    )
    async with rig(settings, f"ws://127.0.0.1:{port}") as r:
        r.finished(record)
        await wait_until(lambda: r.state(record) == "failed")
        async with running(agent.server(ws_settings(port=port))):
            # As the fleet does for the retained `online` the restarted agent publishes.
            r.collector.device_online(DEVICE_ID, online=True)
            await wait_until(lambda: r.state(record) == "archived")
    assert agent.store.is_collected(record.event_id)


async def test_a_bug_in_a_catch_up_is_logged_with_its_traceback_and_retried(
    tmp_path: Path,
    agent: Agent,
    server: WsServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = add_event(agent.store)
    settings = settings_for(tmp_path, catchup_interval_s=600)
    async with rig(settings, url_of(server)) as r:
        done_seq = r.db.done_seq
        calls = 0

        def broken_once(device_id: str) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in the catch-up")
            return done_seq(device_id)

        monkeypatch.setattr(r.db, "done_seq", broken_once)
        with caplog.at_level(logging.ERROR, logger="controller.collector"):
            r.collector.request_catch_up(DEVICE_ID)
            await wait_until(
                lambda: (row := r.db.event(record.event_id)) is not None and row.state == "archived"
            )
    failures = [rec for rec in caplog.records if "failed unexpectedly" in rec.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "a bug in the catch-up" in str(failures[0].exc_info[1])


async def test_a_device_reported_stopped_is_caught_up_only_once_it_is_online(
    tmp_path: Path,
) -> None:
    """At start the retained `stopped` comes, then the retained `info`, whose URL asks for a
    catch-up: the device is away, so no connection is tried (and no failure logged) until its
    `online`."""
    settings = settings_for(tmp_path, catchup_interval_s=600)
    async with BrokenWsServer() as broken, rig(settings, broken.url) as r:
        r.collector.device_online(DEVICE_ID, online=False)
        r.collector.request_catch_up(DEVICE_ID)
        await asyncio.sleep(0.5)  # a catch-up would have connected by now
        assert broken.arrivals == []
        r.collector.device_online(DEVICE_ID, online=True)
        await wait_until(lambda: len(broken.arrivals) >= 1)
