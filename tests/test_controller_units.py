"""Controller pieces without services: settings, database cursor, archive claims, fleet input
checks, CLI argument parsing."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.archive import Archive
from controller.collector import Collector
from controller.commands import UsageError, parse_assignments, parse_since, table
from controller.db import Database
from controller.fleet import Fleet
from controller.mqtt import Message, run_subscriptions, stale_subscriptions
from controller.progress import TerminalProgress, bar
from controller.settings import ControllerSettings, ControllerSettingsError, load_settings
from edge.messages.common import EventFile, EventRecord

ONSET = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def record(seq: int, device_id: str = "pi1", with_file: bool = True) -> EventRecord:
    return EventRecord(
        event_id=uuid.uuid4().hex,
        seq=seq,
        device_id=device_id,
        onset_time=ONSET + timedelta(seconds=seq),
        offset_time=ONSET + timedelta(seconds=seq + 1),
        duration_s=1.0,
        file_start_time=ONSET + timedelta(seconds=seq - 1),
        pre_roll_s=1.0,
        post_roll_s=1.0,
        peak_dbfs=-10.0,
        noise_floor_dbfs=-60.0,
        file=EventFile(
            name=f"{device_id}_{seq:06d}.wav",
            size_bytes=100,
            sha256="0" * 64,
            format="wav",
            duration_s=3.0,
            samplerate=48000,
            channels=1,
        )
        if with_file
        else None,
    )


# -- settings -----------------------------------------------------------------------------------


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_ARCHIVE_DIR", str(tmp_path))
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_WS_TOKEN", "fleet")
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_WS_TOKENS", '{"pi2": "own"}')
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_WS_URLS", '{"pi2": "ws://10.0.0.2:8765"}')
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_MQTT__PORT", "1884")
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_MQTT__SHARED_GROUP", "archivers")
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_COLLECTOR__MAX_DOWNLOADS", "3")
    settings = load_settings()
    assert settings.archive_dir == tmp_path
    assert settings.database_path == tmp_path / "controller.db"
    assert settings.token_for("pi1") == "fleet"
    assert settings.token_for("pi2") == "own"
    assert settings.ws_urls == {"pi2": "ws://10.0.0.2:8765"}
    assert settings.mqtt.port == 1884
    assert settings.collector.max_downloads == 3
    assert run_subscriptions(settings.mqtt) == [
        "soundedge/+/status",
        "soundedge/+/info",
        "soundedge/+/health",
        "soundedge/+/config",
        "$share/archivers/soundedge/+/event",
    ]
    # A persistent session from before the group may still hold the plain event filter.
    assert stale_subscriptions(settings.mqtt) == ["soundedge/+/event"]


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("SOUNDEDGE_CONTROLLER_MQTT__PORT", "99999", "SOUNDEDGE_CONTROLLER_MQTT__PORT"),
        ("SOUNDEDGE_CONTROLLER_WS_TOKENS", "{not json", "SOUNDEDGE_CONTROLLER_WS_TOKENS"),
        ("SOUNDEDGE_CONTROLLER_WS_TOKENS", '{"bad/id": "x"}', "SOUNDEDGE_CONTROLLER_WS_TOKENS"),
        (
            "SOUNDEDGE_CONTROLLER_COLLECTOR__MAX_DOWNLOADS",
            "0",
            "SOUNDEDGE_CONTROLLER_COLLECTOR__MAX_DOWNLOADS",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ControllerSettingsError) as caught:
        load_settings()
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_setting_stops_the_command_line_with_exit_status_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    env["SOUNDEDGE_CONTROLLER_COLLECTOR__MAX_DOWNLOADS"] = "many"
    result = subprocess.run(
        [sys.executable, "-m", "controller", "devices"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("soundedge-controller: error: ")
    assert "SOUNDEDGE_CONTROLLER_COLLECTOR__MAX_DOWNLOADS" in result.stderr


def test_a_shared_group_needs_mqtt_5() -> None:
    with pytest.raises(ControllerSettingsError, match="protocol 5"):
        load_settings(mqtt={"shared_group": "g", "protocol": "3.1.1"})


# -- database -----------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "c.db")
    database.open()
    return database


def test_the_cursor_moves_over_done_and_absent_seqs_only(db: Database) -> None:
    records = [record(seq) for seq in (1, 2, 4, 5)]
    for rec in records:
        assert db.record_end(rec) == "pending"
    db.mark_archived(records[0].event_id, Path("a"), acked=True)
    assert db.done_seq("pi1") == 1
    db.mark_archived(records[2].event_id, Path("c"), acked=True)
    assert db.done_seq("pi1") == 1  # 2 is still pending
    db.mark_archived(records[1].event_id, Path("b"), acked=True)
    assert db.done_seq("pi1") == 2  # 3 is unknown
    assert db.advance_cursor("pi1", frozenset({3})) == 4
    db.mark_attempt(records[3].event_id, "gone", "unavailable")
    assert db.done_seq("pi1") == 5


def test_an_event_without_a_file_needs_nothing(db: Database) -> None:
    assert db.record_end(record(1, with_file=False)) == "no_file"
    assert db.done_seq("pi1") == 1


def test_state_survives_a_reopen(db: Database, tmp_path: Path) -> None:
    rec = record(1)
    db.record_start("pi1", rec.event_id, 1, rec.onset_time)
    db.set_status("pi1", "online")
    assert db.record_end(rec) == "pending"
    db.mark_archived(rec.event_id, Path("x.wav"), acked=False)
    db.close()
    again = Database(tmp_path / "c.db")
    again.open()
    row = again.event(rec.event_id)
    assert row is not None
    assert (row.state, row.path, row.record) == ("archived", "x.wav", rec)
    assert [d.status for d in again.devices()] == ["online"]
    assert again.record_end(rec) == "archived"  # a repeated `end`: nothing to do
    assert [r.event_id for r in again.unacked("pi1")] == [rec.event_id]


@given(st.permutations(list(range(1, 9))), st.sets(st.integers(1, 8)))
def test_the_cursor_is_the_longest_done_prefix(order: list[int], done: set[int]) -> None:
    database = Database(Path(":memory:"))
    database.open()
    records = {seq: record(seq) for seq in order}
    for seq in order:
        database.record_end(records[seq])
        if seq in done:
            database.mark_archived(records[seq].event_id, Path("p"), acked=True)
    prefix = 0
    while prefix + 1 in done:
        prefix += 1
    assert database.done_seq("pi1") == prefix
    database.close()


# -- archive ------------------------------------------------------------------------------------


def test_claims_keep_two_controllers_off_the_same_file(tmp_path: Path) -> None:
    one = Archive(tmp_path, "ctl-1", 0, claim_timeout_s=600)
    two = Archive(tmp_path, "ctl-2", 0, claim_timeout_s=600)
    one.open()
    two.open()
    assert one.claim("e1") is None
    assert two.claim("e1") == "ctl-1"
    one.release("e1")
    assert two.claim("e1") is None


def test_an_abandoned_claim_is_taken_over(tmp_path: Path) -> None:
    one = Archive(tmp_path, "ctl-1", 0, claim_timeout_s=600)
    one.open()
    assert one.claim("e1") is None
    impatient = Archive(tmp_path, "ctl-2", 0, claim_timeout_s=1e-9)
    assert impatient.claim("e1") is None
    # A restart of ctl-2 drops the claims it left behind.
    Archive(tmp_path, "ctl-2", 0, claim_timeout_s=600).open()
    assert one.claim("e1") is None


def test_a_sidecar_is_what_makes_a_file_archived(tmp_path: Path) -> None:
    archive = Archive(tmp_path, "ctl", 0, 600)
    archive.open()
    rec = record(1)
    assert rec.file is not None
    path = archive.prepare_directory(rec) / rec.file.name
    path.write_bytes(b"x" * rec.file.size_bytes)
    assert archive.is_archived(rec) is None
    archive.write_sidecar(path, rec, "ws://pi1:8765")
    assert archive.is_archived(rec) == path
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["event_id"] == rec.event_id
    assert sidecar["collected_by"] == "ctl"
    assert path.parent == tmp_path / "pi1" / "2026-11-25"


# -- fleet input --------------------------------------------------------------------------------


def message(topic: str, payload: bytes | str) -> Message:
    data = payload.encode() if isinstance(payload, str) else payload
    return Message(topic=topic, payload=data, retain=False, qos=1, mid=1)


async def test_malformed_and_foreign_messages_are_logged_and_dropped(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ControllerSettings(archive_dir=tmp_path)
    archive = Archive(tmp_path, "ctl", 0, 600)
    collector = Collector(settings, db, archive, lambda _: None)
    fleet = Fleet(settings, db, collector)
    good = record(1, device_id="pi1").model_dump(mode="json")
    bad_inputs = [
        message("soundedge/pi1/event", b"\xff\xfe"),
        message("soundedge/pi1/event", "{}"),
        message(
            "soundedge/pi1/event", json.dumps({**good, "type": "end", "ws_url": "ws://x"})[:-5]
        ),
        message("soundedge/pi2/event", json.dumps({**good, "type": "end", "ws_url": "ws://x"})),
        message("soundedge/pi1/health", '{"schema_version": 1}'),
        message("soundedge/pi1/status", "maybe"),
        message("elsewhere/pi1/event", "{}"),
        message("soundedge/pi1/extra/event", "{}"),
    ]
    async with asyncio.timeout(30):
        for item in bad_inputs:
            await fleet.handle(item)
    assert fleet.rejected == len(bad_inputs)
    assert db.events() == []
    assert "differs from the topic" in caplog.text
    async with asyncio.timeout(30):
        await fleet.handle(
            message("soundedge/pi1/event", json.dumps({**good, "type": "end", "ws_url": "ws://x"}))
        )
    assert [r.state for r in db.events()] == ["pending"]
    assert fleet.url_of("pi1") == "ws://x"


# -- command line -------------------------------------------------------------------------------


def test_assignments_become_a_nested_change() -> None:
    change = parse_assignments(
        ["detector.threshold_db=8", "detector.a_weighting=true", "enabled=false", "x.y=abc"]
    )
    assert change == {
        "detector": {"threshold_db": 8, "a_weighting": True},
        "enabled": False,
        "x": {"y": "abc"},
    }
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(UsageError):
            parse_assignments([bad])
    with pytest.raises(UsageError, match="set twice"):
        parse_assignments(["a=1", "a.b=2"])


def test_since_takes_an_age_or_a_time() -> None:
    assert parse_since("2026-11-25T12:00:00Z") == ONSET
    assert parse_since("2026-11-25T12:00:00") == ONSET
    age = parse_since("2h")
    assert age is not None
    assert timedelta(hours=1.9) < datetime.now(UTC) - age < timedelta(hours=2.1)
    with pytest.raises(UsageError, match="--since"):
        parse_since("yesterday")


def test_table_and_progress_rendering() -> None:
    assert table(["id", "status"], [["pi1", "online"]]) == "id   status\npi1  online"
    assert bar(5, 10, width=10) == "[#####.....] 5/10"
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    progress.download_queued(2)
    progress.download_started()
    progress.download_finished(True, 2_000_000)
    progress.catch_up("pi1", 1, 4)
    assert "catch-up pi1 [#####...............] 1/4" in progress.status_line()
    assert "downloads [##########..........] 1/2 (0 active)" in progress.status_line()
    assert "1 archived (2.0 MB), 0 failed" in progress.status_line()
