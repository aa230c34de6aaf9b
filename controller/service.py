"""`soundedge-controller run`: the database, the archive, the collector and MQTT, wired.

Long-lived tasks in one TaskGroup: the MQTT supervisor (whose sessions feed the fleet) and the
collector. SIGTERM/SIGINT set `stop`; work in progress is cancelled (partial downloads resume
next time), unhandled MQTT messages stay with the broker, the database is closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from controller.archive import Archive
from controller.collector import Collector
from controller.db import Database
from controller.errors import ControllerError
from controller.fleet import Fleet
from controller.mqtt import run_subscriptions, stale_subscriptions, supervise
from controller.progress import Progress
from controller.settings import ControllerSettings
from edge.watchdog import ServiceHeartbeat

logger = logging.getLogger(__name__)


class Controller:
    """One running controller instance."""

    def __init__(self, settings: ControllerSettings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.db = Database(settings.database_path)
        self.archive = Archive(
            settings.archive_dir,
            settings.controller_id,
            int(settings.collector.min_free_mb * 1e6),
            settings.collector.claim_timeout_s,
        )
        self.collector = Collector(settings, self.db, self.archive, self._url_of, progress=progress)
        self.fleet = Fleet(settings, self.db, self.collector)
        self.stop = asyncio.Event()
        self.started = asyncio.Event()

    def _url_of(self, device_id: str) -> str | None:
        return self.fleet.url_of(device_id)

    def request_stop(self) -> None:
        if not self.stop.is_set():
            logger.info("stopping")
        self.stop.set()

    async def run(self) -> None:
        """Run until `request_stop()`; raises ControllerError if the database or the archive
        cannot be opened, or on an MQTT authentication failure."""
        await asyncio.to_thread(self.db.open)
        try:
            await asyncio.to_thread(self.archive.open)
            await self.fleet.load()
            await self.collector.start()
            mqtt = self.settings.mqtt
            filters = run_subscriptions(mqtt)
            logger.info(
                "controller %s: archive %s, database %s%s",
                self.settings.controller_id,
                self.settings.archive_dir,
                self.settings.database_path,
                f", shared group {mqtt.shared_group!r}" if mqtt.shared_group else "",
            )
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self.collector.run(self.stop), name="collector")
                    tasks.create_task(
                        supervise(
                            mqtt,
                            self.settings.mqtt_client_id,
                            filters,
                            self.fleet.session,
                            self.stop,
                            stale_subscriptions(mqtt),
                        ),
                        name="mqtt",
                    )
                    tasks.create_task(
                        ServiceHeartbeat(status=self.describe).run(self.stop), name="systemd"
                    )
                    self.started.set()
            except ExceptionGroup as group:
                # A task failed on purpose (e.g. the broker refused the login): one clear error.
                expected = [e for e in group.exceptions if isinstance(e, ControllerError)]
                if expected:
                    raise expected[0] from None
                raise
        finally:
            await asyncio.to_thread(self.db.close)
        logger.info(
            "stopped; %d files archived this run (%d bytes)",
            self.collector.stats.archived,
            self.collector.stats.archived_bytes,
        )

    def describe(self) -> str:
        """One line for systemd's STATUS."""
        stats = self.collector.stats
        return (
            f"{self.collector.online_count} device(s) online; {stats.archived} file(s) "
            f"archived this run; {self.collector.backlog} to collect"
        )

    def install_signal_handlers(self) -> None:
        if sys.platform == "win32":
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
