"""One download per event at a time: the `.part` file is locked for the whole download, and
archive claims name their process (so `fetch` next to `run` keeps off its downloads) and are
refreshed while held (so a group member does not take over a download in progress)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.archive import Archive
from controller.wsclient import AgentClient, PartFileBusyError
from edge.wsserver import WsServer
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    TOKEN,
    Agent,
    add_event,
    running,
    url_of,
    ws_settings,
)

EVENT = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as agent:
        yield agent


@pytest.fixture
async def server(agent: Agent) -> AsyncIterator[WsServer]:
    async with running(agent.server(ws_settings())) as server:
        yield server


def holding_process(code: str) -> subprocess.Popen[str]:
    """A Python process that runs `code`, prints `ready` and waits until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nprint('ready', flush=True)\nimport time\ntime.sleep(600)"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()  # as a crash would: no clean-up
    process.wait(TIMEOUT_S)
    assert process.stdout is not None
    process.stdout.close()


async def test_a_part_file_another_download_holds_is_left_alone(
    agent: Agent, server: WsServer, tmp_path: Path
) -> None:
    record = add_event(agent.store, frames=200_000)
    assert record.file is not None
    path = agent.store.file_for(record.event_id)
    assert path is not None
    data = path.read_bytes()
    dest = tmp_path / "archive"
    dest.mkdir()
    part = dest / f".{record.event_id}.part"
    # Another process (say `fetch`) is downloading the event: it holds the .part file, with
    # the first bytes written so far.
    holder = holding_process(
        "from pathlib import Path\n"
        "from controller.wsclient import _PartFile, _Target\n"
        f"held = _PartFile.acquire(_Target(Path({str(dest)!r}), {record.event_id!r}, None))\n"
        f"held.handle.write(bytes.fromhex({data[:5000].hex()!r})); held.handle.flush()\n"
    )
    try:
        async with AgentClient(url_of(server), TOKEN, "pc-1") as client, asyncio.timeout(TIMEOUT_S):
            with pytest.raises(PartFileBusyError, match="another download"):
                await client.download(record.event_id, dest, record.file)
            assert part.read_bytes() == data[:5000]  # not truncated, not appended to
            assert not (dest / record.file.name).exists()
    finally:
        kill(holder)
    # The lock went with the process; the next attempt resumes from its bytes.
    sent_before = server.stats.bytes_sent
    async with AgentClient(url_of(server), TOKEN, "pc-1") as client, asyncio.timeout(TIMEOUT_S):
        final = await client.download(record.event_id, dest, record.file)
    assert server.stats.bytes_sent - sent_before == len(data) - 5000
    assert final.read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == [record.file.name]


async def test_two_downloads_of_one_event_in_one_process_do_not_share_the_part_file(
    agent: Agent, server: WsServer, tmp_path: Path
) -> None:
    record = add_event(agent.store, frames=2_000_000)  # 4 MB
    assert record.file is not None
    dest = tmp_path / "archive"
    dest.mkdir()
    async with (
        AgentClient(url_of(server), TOKEN, "run") as run,
        AgentClient(url_of(server), TOKEN, "fetch") as fetch,
        asyncio.timeout(TIMEOUT_S),
    ):
        outcomes = await asyncio.gather(
            run.download(record.event_id, dest, record.file),
            fetch.download(record.event_id, dest, record.file),
            return_exceptions=True,
        )
    final = dest / record.file.name
    # One wrote the file; the other found it already verified or was told to come back
    # later: it never wrote into the first one's .part file.
    assert final in outcomes
    assert all(o == final or isinstance(o, PartFileBusyError) for o in outcomes), outcomes
    path = agent.store.file_for(record.event_id)
    assert path is not None
    assert final.read_bytes() == path.read_bytes()


def test_fetch_keeps_off_the_claims_of_a_running_run(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    # `run`, with this controller id, is downloading EVENT in another process.
    run = holding_process(
        "from pathlib import Path\n"
        "from controller.archive import Archive\n"
        f"archive = Archive(Path({str(root)!r}), 'archiver-1', 0, 600.0)\n"
        "archive.open()\n"
        f"assert archive.claim({EVENT!r}) is None\n"
    )
    try:
        fetch = Archive(root, "archiver-1", 0, 600.0)  # what `fetch` builds
        fetch.open()
        assert (root / ".claims" / EVENT).exists()
        holder = fetch.claim(EVENT)
        assert holder is not None
        assert f"pid {run.pid}" in holder
    finally:
        kill(run)
    # Killed in mid-download: its claim is taken over at once (no claim timeout to wait).
    assert fetch.claim(EVENT) is None
    fetch.release(EVENT)
    assert not (root / ".claims" / EVENT).exists()


def test_a_claim_in_use_is_refreshed_and_not_taken_over(tmp_path: Path) -> None:
    holder = Archive(tmp_path, "ctl-1", 0, claim_timeout_s=0.4)
    other = Archive(tmp_path, "ctl-2", 0, claim_timeout_s=0.4)
    holder.open()
    other.open()
    assert holder.claim(EVENT) is None
    time.sleep(1.2)  # three claim timeouts of a download still in progress
    assert other.claim(EVENT) == "ctl-1"
    holder.release(EVENT)
    assert other.claim(EVENT) is None
    # A late release of a claim taken over leaves the new holder's claim alone.
    holder.release(EVENT)
    assert holder.claim(EVENT) == "ctl-2"
    other.close()
    assert not (tmp_path / ".claims" / EVENT).exists()
