"""Faults with the whole system running: Mosquitto, two agents on the virtual microphone and
the controller. Each test ends with `Ledger.check()`: every event the agents logged is in the
archive once, verified, and in the MQTT `end` stream (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.conftest import Ledger, restart
from tests.system.proxy import TcpProxy
from tests.test_controller_system import archived_ids, cli_env, eventually, running, wait_until

pytestmark = [pytest.mark.system, pytest.mark.slow]


async def test_broker_stopped_in_the_middle_of_events_and_restarted(ledger: Ledger) -> None:
    long_tone = ledger.mic.write_tone("long.wav", seconds=3.0, amplitude=0.4)
    async with running(ledger.settings()):
        await ledger.play(1)
        player = ledger.mic.play(long_tone, wait=False)
        # Both agents announced the start of the long event: its end comes while the broker
        # is away.
        await asyncio.to_thread(
            ledger.ends.wait_for,
            lambda _: all(len(ledger.ends.start_ids(a.device_id)) >= 2 for a in ledger.agents),
            30,
        )
        await asyncio.to_thread(ledger.broker.stop)
        await asyncio.to_thread(player.wait, 30)
        await ledger.play(4)
        await asyncio.to_thread(ledger.broker.start)
        await ledger.wait_archived()
        await ledger.wait_ends()
    outcome = ledger.check()
    assert outcome.lost == 0


async def test_broker_restarted_with_its_persistence_wiped(ledger: Ledger) -> None:
    async with running(ledger.settings()) as controller:
        await ledger.play(1)
        await ledger.wait_archived()
        await asyncio.to_thread(ledger.broker.stop)
        (ledger.broker.workdir / "mosquitto.db").unlink()
        await ledger.play(3)  # kept in the agents' outboxes meanwhile
        await asyncio.to_thread(ledger.broker.start)
        await ledger.wait_archived()
        await ledger.play(4)  # and everything works as before afterwards
        await ledger.wait_archived()
    # The `end` messages published before the recorder subscribed again to the wiped broker
    # are not in its stream (it had lost its session too): the archive is the ledger here.
    outcome = ledger.check(end_stream=False)
    assert outcome.lost == 0
    assert controller.collector.stats.archived == 8


async def test_agent_killed_with_undelivered_events_in_its_outbox(ledger: Ledger) -> None:
    dev_a = ledger.agent("dev-a")
    async with running(ledger.settings()):
        await ledger.play(1)
        await asyncio.to_thread(ledger.broker.stop)
        await ledger.play(3)
        await asyncio.to_thread(ledger.broker.start)
        # SIGKILL while it reconnects and delivers its outbox (6 messages waiting).
        assert dev_a.proc is not None
        dev_a.proc.send_signal(signal.SIGKILL)
        dev_a.proc.wait(timeout=30)
        await asyncio.to_thread(restart, dev_a)
        await ledger.play(4)
        await ledger.wait_archived()
        await ledger.wait_ends()
    outcome = ledger.check()
    assert outcome.lost == 0
    assert [r["seq"] for r in dev_a.records()] == [1, 2, 3, 4]


async def test_agent_killed_while_writing_an_event_file(ledger: Ledger) -> None:
    dev_a = ledger.agent("dev-a")
    long_tone = ledger.mic.write_tone("long.wav", seconds=4.0, amplitude=0.4)
    async with running(ledger.settings()):
        await ledger.play(1)
        player = ledger.mic.play(long_tone, wait=False)
        # The `start` message says the file is being written; kill before it is finished.
        await asyncio.to_thread(
            ledger.ends.wait_for, lambda _: len(ledger.ends.start_ids("dev-a")) >= 2, 30
        )
        assert dev_a.proc is not None
        dev_a.proc.send_signal(signal.SIGKILL)
        dev_a.proc.wait(timeout=30)
        await asyncio.to_thread(player.wait, 30)
        await asyncio.to_thread(restart, dev_a)  # salvages the partial file into an event
        assert "salvaged" in dev_a.output()
        await ledger.play(3)
        await ledger.wait_archived()
        await ledger.wait_ends()
    outcome = ledger.check()
    assert outcome.lost == 0
    seqs = [r["seq"] for r in dev_a.records()]
    assert seqs == sorted(seqs)
    assert len(seqs) == len(set(seqs))
    # The salvaged event kept the id its `start` carried: no event is left half known.
    assert set(ledger.ends.start_ids("dev-a")) <= {r["event_id"] for r in dev_a.records()}


async def test_network_between_controller_and_one_agent_cut_and_restored(
    ledger: Ledger,
) -> None:
    dev_a = ledger.agent("dev-a")
    async with TcpProxy(dev_a.ws_port) as proxy:
        settings = ledger.settings(ws_urls={"dev-a": proxy.url})
        async with running(settings):
            await ledger.play(1)
            await ledger.wait_archived()
            proxy.cut()
            await ledger.play(3)
            # dev-b is collected meanwhile; dev-a waits.
            dev_b_ids = {r["event_id"] for r in ledger.agent("dev-b").records()}
            await eventually(lambda: dev_b_ids <= set(archived_ids(ledger.archive)))
            assert not {r["event_id"] for r in dev_a.records()} <= set(archived_ids(ledger.archive))
            await asyncio.sleep(5.0)  # an outage longer than a few retries
            proxy.restore()
            await ledger.play(4)
            await ledger.wait_archived()
            await ledger.wait_ends()
    outcome = ledger.check()
    assert outcome.lost == 0


async def test_controller_killed_during_a_download_and_restarted_later(
    ledger: Ledger, tmp_path: Path
) -> None:
    # Downloads go through throttling proxies so that one is surely in progress when killed.
    long_tone = ledger.mic.write_tone("long.wav", seconds=3.0, amplitude=0.4)
    async with (
        TcpProxy(ledger.agent("dev-a").ws_port, rate_bytes_s=40_000) as proxy_a,
        TcpProxy(ledger.agent("dev-b").ws_port, rate_bytes_s=40_000) as proxy_b,
    ):
        env = cli_env(ledger.broker, tmp_path)
        env["SOUNDEDGE_CONTROLLER_WS_URLS"] = json.dumps(
            {"dev-a": proxy_a.url, "dev-b": proxy_b.url}
        )
        log_path = tmp_path / "controller.log"

        def start() -> subprocess.Popen[bytes]:
            with log_path.open("ab") as log:
                return subprocess.Popen(
                    [sys.executable, "-m", "controller", "run"], env=env, stdout=log, stderr=log
                )

        controller = start()
        try:
            await asyncio.to_thread(
                wait_until, lambda: "dev-b is online" in log_path.read_text(), "the controller"
            )
            await asyncio.to_thread(ledger.mic.play, long_tone)
            parts = lambda: list(ledger.archive.rglob("*.part"))  # noqa: E731
            await eventually(lambda: bool(parts()), interval_s=0.05)
            controller.send_signal(signal.SIGKILL)
            controller.wait(timeout=30)
            assert parts(), "no download was in progress"
            await ledger.play(3)  # while the controller is away
            controller = start()
            await ledger.wait_archived()
            await ledger.wait_ends()
        finally:
            if controller.poll() is None:
                controller.send_signal(signal.SIGTERM)
                controller.wait(timeout=60)
    outcome = ledger.check()
    assert outcome.lost == 0
    assert "Traceback" not in log_path.read_text()


async def test_sound_card_vanishing_and_returning(ledger: Ledger) -> None:
    async with running(ledger.settings()):
        await ledger.play(1)
        await asyncio.to_thread(ledger.mic.unplug)
        await asyncio.sleep(4.0)  # longer than the stall timeout: the agents notice
        await asyncio.to_thread(ledger.mic.replug)
        await asyncio.to_thread(
            wait_until,
            lambda: all(a.output().count("capturing from") >= 2 for a in ledger.agents),
            "the agents to capture again",
        )
        await asyncio.sleep(2.0)  # the noise floor settles again
        await ledger.play(3)
        await ledger.wait_archived()
        await ledger.wait_ends()
    outcome = ledger.check()
    assert outcome.lost == 0


async def test_agent_killed_during_an_upload(ledger: Ledger) -> None:
    dev_a = ledger.agent("dev-a")
    long_tone = ledger.mic.write_tone("long.wav", seconds=3.0, amplitude=0.4)
    async with (
        TcpProxy(dev_a.ws_port, rate_bytes_s=40_000) as proxy,
        running(ledger.settings(ws_urls={"dev-a": proxy.url})),
    ):
        await ledger.play(1)
        await ledger.wait_archived()
        await asyncio.to_thread(ledger.mic.play, long_tone)
        parts = lambda: list((ledger.archive / "dev-a").rglob("*.part"))  # noqa: E731
        await eventually(lambda: bool(parts()), interval_s=0.05)
        assert dev_a.proc is not None
        dev_a.proc.send_signal(signal.SIGKILL)  # in the middle of sending that file
        dev_a.proc.wait(timeout=30)
        await asyncio.to_thread(restart, dev_a)
        await ledger.play(3)
        await ledger.wait_archived()
        await ledger.wait_ends()
    outcome = ledger.check()
    assert outcome.lost == 0


async def test_a_long_cut_with_no_new_event_afterwards_is_caught_up(ledger: Ledger) -> None:
    """Downloads that ran out of attempts during the cut are fetched again by a catch-up,
    although nothing new happens on the device after the network returns."""
    dev_a = ledger.agent("dev-a")
    async with TcpProxy(dev_a.ws_port) as proxy:
        settings = ledger.settings(
            ws_urls={"dev-a": proxy.url},
            collector={"max_attempts": 2, "catchup_interval_s": 5},
        )
        async with running(settings) as controller:
            proxy.cut()
            await ledger.play(2)
            await eventually(lambda: controller.collector.stats.given_up >= 1)
            proxy.restore()
            await ledger.wait_archived()
            await ledger.wait_ends()
    assert ledger.check().lost == 0
