"""The durable outbox: ordered, at-least-once, nothing removed before its acknowledgement,
and it survives a crash (an outbox dropped without flush or close, as after kill -9)."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.messages.common import EventRecord
from edge.messages.mqtt import EventStartMessage, parse_event_message
from edge.outbox import Outbox, OutboxItem
from edge.settings import StorageSettings
from edge.store import EventStore

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
WS = "ws://pi:8765"


class World:
    """A store and its outbox; `crash()` reopens both from disk only."""

    def __init__(
        self, data_dir: Path, storage: StorageSettings | None = None, t0: datetime = T0
    ) -> None:
        self.data_dir = data_dir
        self.storage = storage or StorageSettings()
        self.t0 = t0
        self.store = EventStore(data_dir, "pi", self.storage)
        self.store.open()
        self.outbox = self._open_outbox()
        self.ids: dict[int, str] = {}

    def _open_outbox(self) -> Outbox:
        outbox = Outbox(self.data_dir / "state", self.store, WS)
        outbox.open()
        return outbox

    def start(self) -> int:
        seq = self.store.reserve_seq()
        self.ids[seq] = uuid.uuid4().hex
        self.outbox.add_start(
            EventStartMessage(
                event_id=self.ids[seq], seq=seq, device_id="pi",
                onset_time=self.t0 + timedelta(seconds=seq), level_dbfs=-20.0,
                noise_floor_dbfs=None,
            )
        )  # fmt: skip
        return seq

    def finish(self, seq: int) -> None:
        onset = self.t0 + timedelta(seconds=seq)
        self.store.add(
            EventRecord(
                event_id=self.ids[seq], seq=seq, device_id="pi", onset_time=onset,
                offset_time=onset, duration_s=0.0, file_start_time=onset, pre_roll_s=0.0,
                post_roll_s=0.0, peak_dbfs=-3.0, noise_floor_dbfs=-60.0,
            ),
            None,
        )  # fmt: skip

    def close(self) -> None:
        self.outbox.close()
        self.store.close()

    def crash(self) -> None:
        # No flush, no close of the outbox: only what reached the disk counts.
        self.outbox.close()
        self.store.close()
        self.store = EventStore(self.data_dir, "pi", self.storage)
        self.store.open()
        self.outbox = self._open_outbox()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    instance = World(tmp_path)
    yield instance
    instance.close()


def test_messages_go_in_seq_order_start_before_end(world: World) -> None:
    first = world.start()
    second = world.start()
    world.finish(first)
    world.finish(second)
    items = world.outbox.next_items(10)
    assert [(i.stream, i.seq) for i in items] == [
        ("start", first), ("end", first), ("start", second), ("end", second),
    ]  # fmt: skip
    end = parse_event_message(items[1].payload)
    assert end.type == "end"
    assert end.ws_url == WS  # type: ignore[union-attr]
    # An end can be held back until its start is known.
    assert [(i.stream, i.seq) for i in world.outbox.next_items(10, end_max_seq=first)] == [
        ("start", first), ("end", first), ("start", second),
    ]  # fmt: skip


def test_nothing_is_removed_before_its_ack_even_across_a_crash(world: World) -> None:
    for _ in range(3):
        world.finish(world.start())
    items = world.outbox.next_items(10)
    for item in items:
        world.outbox.mark_sent(item)
    # Acks for the first event only; a later ack out of order does not move the cursor past
    # an unacknowledged message.
    world.outbox.ack(items[0])
    world.outbox.ack(items[1])
    world.outbox.ack(items[5])
    world.outbox.flush()
    assert world.outbox.depth == 4
    world.crash()
    again = world.outbox.next_items(10)
    assert [(i.stream, i.seq) for i in again] == [(i.stream, i.seq) for i in items[2:]]
    # Without a flush the acks are not durable: delivered twice, never lost.
    for item in again:
        world.outbox.mark_sent(item)
        world.outbox.ack(item)
    world.crash()
    assert world.outbox.depth == 4
    for item in world.outbox.next_items(10):
        world.outbox.mark_sent(item)
        world.outbox.ack(item)
    world.outbox.flush()
    assert world.outbox.depth == 0
    assert (world.data_dir / "state" / "mqtt_starts.jsonl").stat().st_size == 0
    world.crash()
    assert world.outbox.next_items(10) == []


def test_a_torn_last_line_of_the_start_file_is_skipped(world: World) -> None:
    seq = world.start()
    world.outbox.close()
    with (world.data_dir / "state" / "mqtt_starts.jsonl").open("ab") as handle:
        handle.write(b'{"schema_version":1,"type":"sta')
    world.crash()
    assert [(i.stream, i.seq) for i in world.outbox.next_items(10)] == [("start", seq)]
    later = world.start()
    world.crash()
    assert [i.seq for i in world.outbox.next_items(10)] == [seq, later]


def deliver(outbox: Outbox, items: list[OutboxItem]) -> None:
    for item in items:
        outbox.mark_sent(item)
        outbox.ack(item)
    outbox.flush()


def test_mqtt_enabled_again_after_a_compaction_without_it_sends_nothing_forgotten(
    tmp_path: Path,
) -> None:
    storage = StorageSettings(event_log_keep_days=0, event_log_keep_events=1)
    world = World(tmp_path, storage, t0=datetime(2020, 1, 1, tzinfo=UTC))
    try:
        for seq in [world.start() for _ in range(3)]:
            world.finish(seq)
        deliver(world.outbox, world.outbox.next_items(2))  # event 1 only, then the broker left
        # MQTT is turned off: no outbox, nothing gates compaction (as the agent sets it up).
        world.outbox.close()
        world.store.set_delivery_horizon(None)
        for _ in range(2):
            seq = world.store.reserve_seq()
            world.ids[seq] = uuid.uuid4().hex
            world.finish(seq)
        assert world.store.compact() == 4  # all but the newest (5), past the stale cursor
        # MQTT on again: the unacknowledged `start`s of 2 and 3 and the `end`s of 2 to 4 are
        # gone with their records; event 5 still gets its `end`.
        world.crash()
        items = world.outbox.next_items(10)
        assert [(i.stream, i.seq) for i in items] == [("end", 5)]
        assert world.outbox.depth == 1
        deliver(world.outbox, items)
        assert world.outbox.depth == 0
        world.crash()
        assert world.outbox.next_items(10) == []
        assert world.outbox.acked_cursor("end") == 5
    finally:
        world.close()


operations = st.lists(
    st.sampled_from(["start", "finish", "send", "ack", "ack_last", "drop", "flush", "crash"]),
    max_size=40,
)


@given(operations)
def test_every_message_is_delivered_in_order_whatever_happens(ops: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        try:
            check_delivery(world, ops)
        finally:
            world.close()


def check_delivery(world: World, ops: list[str]) -> None:
    open_events: list[int] = []
    in_flight: list[OutboxItem] = []
    delivered: list[tuple[str, int]] = []

    def ack(item: OutboxItem) -> None:
        world.outbox.ack(item)
        delivered.append((item.stream, item.seq))

    for op in ops:
        if op == "start":
            open_events.append(world.start())
        elif op == "finish" and open_events:
            world.finish(open_events.pop(0))
        elif op == "send":
            for item in world.outbox.next_items(3):
                world.outbox.mark_sent(item)
                in_flight.append(item)
        elif op == "ack" and in_flight:
            ack(in_flight.pop(0))
        elif op == "ack_last" and in_flight:
            ack(in_flight.pop())
        elif op == "drop":  # connection lost
            world.outbox.rewind()
            in_flight.clear()
        elif op == "flush":
            world.outbox.flush()
        elif op == "crash":
            world.crash()
            in_flight.clear()
    for seq in open_events:
        world.finish(seq)
    world.outbox.rewind()
    while items := world.outbox.next_items(5):
        for item in items:
            world.outbox.mark_sent(item)
            ack(item)
    world.outbox.flush()

    everything = {(kind, seq) for seq in world.ids for kind in ("start", "end")}
    assert set(delivered) == everything
    assert world.outbox.depth == 0
    for kind in ("start", "end"):
        seqs = [seq for stream, seq in delivered if stream == kind]
        firsts = list(dict.fromkeys(seqs))
        # Out-of-order acks aside, each stream is delivered in seq order per session.
        assert sorted(firsts) == sorted(set(seqs))


def test_an_event_finished_after_a_later_one_is_delivered_once(world: World) -> None:
    """Its record comes below the `end` cursor (as an event salvaged at a restart after later
    ones were saved): its `end` still goes, again after a crash until acknowledged, then never."""
    late, later = world.start(), world.start()
    world.finish(later)
    deliver(world.outbox, world.outbox.next_items(10))
    assert world.outbox.acked_cursor("end") == later
    world.finish(late)
    assert world.outbox.depth == 1
    assert [(i.stream, i.seq) for i in world.outbox.next_items(10)] == [("end", late)]
    world.crash()  # sent, not acknowledged: sent again
    items = world.outbox.next_items(10)
    assert [(i.stream, i.seq) for i in items] == [("end", late)]
    assert parse_event_message(items[0].payload).event_id == world.ids[late]
    deliver(world.outbox, items)
    world.crash()
    assert world.outbox.next_items(10) == []
    assert world.outbox.depth == 0
