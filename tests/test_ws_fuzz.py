"""Property test: arbitrary JSON and bytes never crash the server or reach outside its events.

The server runs on its own event loop in a thread for the whole module (hypothesis examples
cannot share function-scoped async fixtures); every example opens a fresh authenticated session,
throws a list of frames at it, then checks that the session still answers and that every reply
is a valid message. An audit hook records every file the process opens under the test's
directory: all of them must lie inside the event directory.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from edge.messages.ws import ErrorCode, ErrorMessage, FileEnd, FileStart, server_message_adapter
from edge.wsserver import WsServer
from tests.fixtures.ws_helpers import (
    TIMEOUT_S,
    Agent,
    add_event,
    auth_headers,
    hello,
    ws_settings,
)

SECRET = b"SECRET-BYTES-THAT-MUST-NEVER-BE-SENT"


@dataclass
class _OpenWatch:
    """Files opened under `root` while `active`; fed by a process-wide audit hook."""

    root: str = ""
    active: bool = False
    opened: list[str] = field(default_factory=list)


_watch = _OpenWatch()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _watch.active and isinstance(args[0], str | Path):
        path = str(args[0])
        if path.startswith(_watch.root):
            _watch.opened.append(path)


# Audit hooks cannot be removed; this one does nothing unless a test here switches it on.
sys.addaudithook(_audit)


class ServerThread:
    """The websocket server on its own loop in a thread."""

    def __init__(self, agent: Agent) -> None:
        self.server: WsServer = agent.server(ws_settings(chunk_bytes=4096))
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="ws-server", daemon=True)
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        task = asyncio.create_task(self.server.run(self._stop))
        await self.server.started.wait()
        self._ready.set()
        await task

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(TIMEOUT_S), "the server did not start"
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}"


@dataclass
class Fixture:
    server: ServerThread
    event_ids: list[str]
    events_dir: Path


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    root = tmp_path_factory.mktemp("wsfuzz")
    (root / "secret.wav").write_bytes(SECRET)
    (root / "data" / "events").mkdir(parents=True)
    (root / "data" / "events" / "secret.wav").symlink_to(root / "secret.wav")
    with Agent(root / "data") as agent:
        ids = [add_event(agent.store, frames=n).event_id for n in (10, 3000)]
        gone = add_event(agent.store)
        path = agent.store.file_for(gone.event_id)
        assert path is not None
        path.unlink()
        ids.append(gone.event_id)
        _watch.root = str(root)
        with ServerThread(agent) as server:
            yield Fixture(server, ids, agent.store.events_dir)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
path_like = st.sampled_from(
    ["../../secret.wav", "../secret.wav", "secret.wav", "/etc/passwd", "..", "/", "~", "%2e%2e"]
)


def messages(event_ids: list[str]) -> st.SearchStrategy[str | bytes]:
    ids = st.sampled_from(event_ids) | path_like | st.text(max_size=40)
    numbers = st.integers(min_value=-(2**70), max_value=2**70) | json_values
    request = st.fixed_dictionaries(
        {"type": st.sampled_from(["list", "get", "ack", "hello", "welcome", "file_end", ""])},
        optional={
            "request_id": st.text(max_size=70) | json_values,
            "event_id": ids,
            "offset": numbers,
            "since_seq": numbers,
            "page_size": numbers,
            "protocol": numbers,
            "path": path_like,
            "extra": json_values,
        },
    )
    # Well-formed requests too, so that real files are read while the rest flies around.
    valid = st.fixed_dictionaries(
        {
            "type": st.sampled_from(["get", "ack", "list"]),
            "request_id": st.text(min_size=1, max_size=10),
            "event_id": st.sampled_from(event_ids),
            "offset": st.integers(min_value=0, max_value=10_000),
        }
    ).map(lambda r: {k: v for k, v in r.items() if r["type"] == "get" or k != "offset"})
    valid = valid.map(
        lambda r: {k: v for k, v in r.items() if r["type"] != "list" or k != "event_id"}
    )
    return st.one_of(
        valid.map(json.dumps),
        request.map(json.dumps),
        json_values.map(json.dumps),
        st.text(max_size=200),
        st.binary(max_size=200),
    )


async def _throw(target: Fixture, frames: list[str | bytes]) -> None:
    async with connect(
        target.server.url,
        additional_headers=auth_headers(),
        proxy=None,
        compression=None,
        max_size=2**22,
        open_timeout=TIMEOUT_S,
    ) as ws:
        await ws.send(hello("pull"))
        async with asyncio.timeout(TIMEOUT_S):
            welcome = server_message_adapter.validate_json(await ws.recv())
        assert welcome.type == "welcome"
        for frame in frames:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "list", "request_id": "\x00sentinel"}))
        in_transfer = False
        async with asyncio.timeout(TIMEOUT_S * 3):
            while True:
                raw = await ws.recv()
                if isinstance(raw, bytes):
                    assert in_transfer, "binary data outside a transfer"
                    assert SECRET not in raw
                    continue
                message = server_message_adapter.validate_json(raw)  # always a valid message
                if isinstance(message, FileStart):
                    assert message.event_id in target.event_ids
                    in_transfer = True
                elif isinstance(message, FileEnd):
                    in_transfer = False
                elif isinstance(message, ErrorMessage):
                    # Replies to other requests interleave with a transfer's chunks; none of
                    # the errors here may end the session.
                    assert message.code in set(ErrorCode)
                    assert not message.fatal
                elif message.type == "events" and message.request_id == "\x00sentinel":
                    break


def test_arbitrary_frames_never_crash_the_server_nor_escape_the_events(
    fuzz_target: Fixture,
) -> None:
    @given(frames=st.lists(messages(fuzz_target.event_ids), min_size=1, max_size=8))
    def throw(frames: list[str | bytes]) -> None:
        asyncio.run(_throw(fuzz_target, frames))
        assert fuzz_target.server.alive

    _watch.opened.clear()
    _watch.active = True
    try:
        throw()
    finally:
        _watch.active = False
    events_dir = str(fuzz_target.events_dir.resolve())
    outside = [p for p in _watch.opened if not str(Path(p).resolve()).startswith(events_dir)]
    assert outside == []
    assert fuzz_target.server.server.stats.internal_errors == 0
    # The examples did reach real files (otherwise the check above proves little).
    assert _watch.opened
