"""Collecting event files: scheduling, concurrency, retries, dedup, gaps and catch-up.

Every finished event with a file becomes one job: claim it, download it over the device's
websocket (verified size and sha256, resumable), write the sidecar, mark it archived, ack it.
A job holds its device's semaphore (`max_downloads_per_device`) and then the global one
(`max_downloads`); a failed attempt is retried with capped, jittered backoff up to
`max_attempts`, after which the event is set aside as failed and its device is caught up again.

Dedup is by `event_id`: at most one job per event in this process, the database remembers what
is archived, and archive claims keep other controllers sharing the archive away from it.

Catch-up lists the device's events since its cursor (`done_seq`: every event up to it needs
nothing more) and collects those still missing. It runs when a device comes online (also at
start, from the retained status), when a `seq` gap shows an `end` message was missed, and
periodically as a safety net.

A catch-up that fails (the websocket is down or unreachable while MQTT still works) or leaves a
download given up is retried with capped, jittered backoff (`retry_min_s` to `retry_max_s`)
until one succeeds, so files arrive soon after the channel is back rather than at the next
periodic catch-up. Fresh evidence that the device is back cuts the wait short: a download from
it that worked, or its status going online (which also forgets the connect backoff its link
built up while it was down). A device whose status says it is offline is not retried; its
coming back online starts a catch-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.archive import Archive, ArchiveError, ArchiveFullError
from controller.db import Database
from controller.errors import (
    AgentConnectionError,
    AgentProtocolError,
    AuthenticationError,
    ControllerError,
    RequestError,
    TransferError,
)
from controller.links import DeviceLink, UrlResolver
from controller.progress import NullProgress, Progress
from controller.settings import ControllerSettings
from controller.wsclient import AgentClient
from edge.aio import sleep_unless
from edge.messages.common import EventRecord
from edge.messages.ws import ErrorCode
from edge.mqtt_client import backoff_delay

logger = logging.getLogger(__name__)

LIST_PAGE_SIZE = 500
STOP_GRACE_S = 15.0  # on stop, how long downloads in progress may take to finish
# The only answers to a `get` that write an event off (`unavailable`, done; the catch-up cursor
# moves past it): the agent never recorded it, or the file it recorded is no longer there. Every
# other code is retried, `internal` above all: the agent could not read a file it still holds
# (EMFILE, EIO, ...), and giving up on it would leave it uncollected there until retention
# deletes it. (Older agents answered such read errors with `file_unavailable` too.)
GONE_CODES = frozenset({ErrorCode.UNKNOWN_EVENT, ErrorCode.FILE_UNAVAILABLE})


class _RetryError(ControllerError):
    """This attempt failed; try again later."""


class _GoneError(ControllerError):
    """The agent no longer has the file: nothing to collect."""


@dataclass
class CollectorStats:
    archived: int = 0
    archived_bytes: int = 0
    already_archived: int = 0
    failed_attempts: int = 0
    given_up: int = 0
    gone: int = 0
    catch_ups: int = 0
    catch_up_retries: int = 0  # catch-ups scheduled after a failure (backoff)
    gaps: int = 0


class Collector:
    """Downloads every event file into the archive; one per controller process."""

    def __init__(
        self,
        settings: ControllerSettings,
        db: Database,
        archive: Archive,
        url_of: UrlResolver,
        progress: Progress | None = None,
    ) -> None:
        self._settings = settings
        self._config = settings.collector
        self._db = db
        self._archive = archive
        self._url_of = url_of
        self._progress: Progress = progress or NullProgress()
        # In a shared-subscription group the other members take some seqs: no gap detection.
        self._shared = settings.mqtt.shared_group is not None
        self._global = asyncio.Semaphore(self._config.max_downloads)
        self._per_device: dict[str, asyncio.Semaphore] = {}
        self._links: dict[str, DeviceLink] = {}
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._catch_ups: dict[str, asyncio.Task[None]] = {}
        self._catch_up_again: set[str] = set()
        # Devices with a download given up during their catch-up in progress: it failed.
        self._catch_up_incomplete: set[str] = set()
        # A failed catch-up waits here for its retry; failures in a row set the backoff.
        self._catch_up_retries: dict[str, asyncio.TimerHandle] = {}
        self._catch_up_failures: dict[str, int] = {}
        # Set (and dropped) when a device is back: jobs waiting to retry it go at once.
        self._device_back: dict[str, asyncio.Event] = {}
        self._last_seq: dict[str, int] = {}
        self._online: set[str] = set()
        self._offline: set[str] = set()  # their last status said so (unknown is neither)
        self._rng = random.Random()
        self._running = False
        self._stopping = False
        self._downloading: set[asyncio.Task[Any]] = set()  # jobs inside the semaphores
        self.stats = CollectorStats()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the database knows and resume unfinished jobs; call before `run`."""
        self._last_seq = await asyncio.to_thread(self._db.highest_end_seqs)
        self._running = True
        for row in await asyncio.to_thread(self._db.unfinished):
            if row.record is not None:
                self._schedule(row.record)

    async def run(self, stop: asyncio.Event) -> None:
        """Catch up periodically until `stop`; then cancel the work in progress (partial
        downloads are kept and resumed next time)."""
        if not self._running:
            await self.start()
        interval = self._config.catchup_interval_s
        try:
            while not stop.is_set():
                await sleep_unless(stop, interval if interval > 0 else None)
                if not stop.is_set():
                    for device_id in sorted(self._online):
                        self.request_catch_up(device_id)
        finally:
            self._running = False
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Let downloads in progress finish (for a while); drop what waits (it is resumed at
        the next start: the database has it as pending)."""
        self._stopping = True
        for timer in self._catch_up_retries.values():
            timer.cancel()
        self._catch_up_retries.clear()
        waiting = [t for t in self._jobs.values() if t not in self._downloading]
        for task in [*waiting, *self._catch_ups.values()]:
            task.cancel()
        if self._downloading:
            logger.info("finishing %d download(s) in progress", len(self._downloading))
            _, late = await asyncio.wait(set(self._downloading), timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
        await asyncio.gather(
            *self._jobs.values(),
            *self._catch_ups.values(),
            return_exceptions=True,
        )
        await self.close_links()

    async def close_links(self) -> None:
        """Close every websocket session."""
        for link in self._links.values():
            await link.reset()

    @property
    def online_count(self) -> int:
        return len(self._online)

    @property
    def backlog(self) -> int:
        """Jobs not finished (queued, running or waiting to retry)."""
        return len(self._jobs)

    async def wait_idle(self) -> None:
        """Until no job and no catch-up is left (for tests and `fetch`); a catch-up waiting
        to be retried is not work in progress."""
        while self._jobs or self._catch_ups:
            await asyncio.gather(
                *self._jobs.values(), *self._catch_ups.values(), return_exceptions=True
            )

    async def collect(self, record: EventRecord) -> None:
        """Collect one event now (`fetch`); returns when archived, gone or given up."""
        task = self._schedule(record)
        if task is not None:
            await task

    # -- inputs from the fleet ------------------------------------------------------------------

    def device_online(self, device_id: str, online: bool) -> None:
        if online:
            came_back = device_id not in self._online
            self._online.add(device_id)
            self._offline.discard(device_id)
            if came_back:
                # The agent just connected to the broker (started, or its network is back):
                # the best sign its websocket is up again. Backoffs built while it was down
                # would only delay the files now.
                if (link := self._links.get(device_id)) is not None:
                    link.forget_backoff()
                self._wake_jobs(device_id)
            self.request_catch_up(device_id)
        else:
            self._online.discard(device_id)
            self._offline.add(device_id)
            # Retrying a device that is away only fills the log; coming back online starts a
            # catch-up anyway.
            self._cancel_catch_up_retry(device_id)
            self._catch_up_failures.pop(device_id, None)

    def event_finished(self, record: EventRecord, state: str) -> None:
        """An `end` message was recorded in the database with `state`."""
        device_id = record.device_id
        # A device never seen before starts at 0: its first event triggers a catch-up of the
        # history it still holds.
        last = self._last_seq.get(device_id, 0)
        if not self._shared and record.seq > last + 1:
            self.stats.gaps += 1
            if last:
                logger.warning(
                    "%s: seq gap (after %d came %d): catching up the missed events",
                    device_id,
                    last,
                    record.seq,
                )
            else:
                logger.info(
                    "%s: first event seen is %d: collecting its history", device_id, record.seq
                )
            self.request_catch_up(device_id)
        self._last_seq[device_id] = max(last, record.seq)
        if state == "pending":
            self._schedule(record)

    def request_catch_up(self, device_id: str) -> None:
        """Catch `device_id` up now (once more after the one in progress, if any); a retry
        waiting out its backoff runs now instead."""
        if not self._running:
            return
        if device_id in self._offline:
            # Its `status` says it is away (`offline` or `stopped`): `online` starts a catch-up.
            # At start the retained `info` (a new URL) comes right after the retained status.
            return
        if device_id in self._catch_ups:
            self._catch_up_again.add(device_id)
            return
        self._cancel_catch_up_retry(device_id)
        task = asyncio.create_task(self._catch_up_loop(device_id), name=f"catch-up {device_id}")
        self._catch_ups[device_id] = task

    # -- catch-up -------------------------------------------------------------------------------

    async def _catch_up_loop(self, device_id: str) -> None:
        complete = False
        try:
            while True:
                self._catch_up_again.discard(device_id)
                self._catch_up_incomplete.discard(device_id)
                complete = await self._catch_up_attempt(device_id)
                if device_id not in self._catch_up_again:
                    return
        finally:
            self._catch_ups.pop(device_id, None)
            if complete:
                self._catch_up_failures.pop(device_id, None)
            else:
                self._retry_catch_up_later(device_id)

    async def _catch_up_attempt(self, device_id: str) -> bool:
        """One catch-up; True if it reached the agent and left no download given up."""
        try:
            await self.catch_up(device_id)
        except ControllerError as exc:
            logger.warning("%s: catch-up failed: %s", device_id, exc)
            return False
        except Exception:
            # A bug, not a device problem: say so with the traceback (a task's exception is
            # otherwise only reported when the task is garbage-collected), and retry later.
            logger.exception("%s: catch-up failed unexpectedly", device_id)
            return False
        return device_id not in self._catch_up_incomplete

    def _retry_catch_up_later(self, device_id: str) -> None:
        """Schedule the next catch-up of a device that failed one, after a capped, jittered
        backoff that grows with the failures in a row: a device that stays down is tried a
        bounded number of times per minute (once capped, tries are `retry_max_s`/2 apart at
        least)."""
        if (
            not self._running
            or self._stopping
            or device_id in self._offline
            or device_id in self._catch_up_retries
        ):
            return
        failures = self._catch_up_failures.get(device_id, 0) + 1
        self._catch_up_failures[device_id] = failures
        delay = backoff_delay(
            failures - 1, self._config.retry_min_s, self._config.retry_max_s, self._rng
        )
        logger.info("%s: catching up again in %.1f s (sooner if it is back)", device_id, delay)
        self.stats.catch_up_retries += 1
        loop = asyncio.get_running_loop()
        self._catch_up_retries[device_id] = loop.call_later(delay, self._catch_up_due, device_id)

    def _catch_up_due(self, device_id: str) -> None:
        self._catch_up_retries.pop(device_id, None)
        self.request_catch_up(device_id)

    def _cancel_catch_up_retry(self, device_id: str) -> None:
        timer = self._catch_up_retries.pop(device_id, None)
        if timer is not None:
            timer.cancel()

    def _download_gave_up(self, device_id: str) -> None:
        """A job set its event aside as failed: the device owes a catch-up."""
        if device_id in self._catch_ups:
            self._catch_up_incomplete.add(device_id)  # the retry follows that catch-up
        else:
            self._retry_catch_up_later(device_id)  # not at once: the device just failed

    def _download_worked(self, device_id: str) -> None:
        """A file came over the device's websocket: if a catch-up waits to be retried, the
        channel is back and it runs now."""
        if device_id in self._catch_up_retries:
            logger.info("%s: reachable again: catching up now", device_id)
            self.request_catch_up(device_id)

    async def catch_up(self, device_id: str) -> int:
        """Collect every event of `device_id` after its cursor; return how many were missing."""
        if self._url_of(device_id) is None:
            logger.debug("%s: no websocket URL yet; catch-up waits for its info", device_id)
            return 0
        self.stats.catch_ups += 1
        since = await asyncio.to_thread(self._db.done_seq, device_id)
        link = self._link(device_id)
        client = await link.client()
        listed = await self._list_since(link, client, since)
        missing = await self._missing_of(device_id, listed, since)
        await self._ack_leftovers(device_id, client)
        if not missing:
            logger.debug("%s: caught up (nothing missing after seq %d)", device_id, since)
            return 0
        logger.info(
            "%s: catch-up: %d event(s) to collect after seq %d", device_id, len(missing), since
        )
        jobs = [self._schedule(record) for record in missing]
        done = 0
        self._progress.catch_up(device_id, done, len(jobs))
        for finished in asyncio.as_completed([asyncio.shield(j) for j in jobs if j is not None]):
            with contextlib.suppress(Exception):
                await finished
            done += 1
            self._progress.catch_up(device_id, done, len(jobs))
        self._progress.catch_up(device_id, len(jobs), len(jobs))
        return len(missing)

    @staticmethod
    async def _list_since(link: DeviceLink, client: AgentClient, since: int) -> list[EventRecord]:
        listed: list[EventRecord] = []
        try:
            async for record in client.list_events(since_seq=since, page_size=LIST_PAGE_SIZE):
                listed.append(record)
        except AgentConnectionError:
            await link.reset()
            raise
        return listed

    async def _missing_of(
        self, device_id: str, listed: list[EventRecord], since: int
    ) -> list[EventRecord]:
        """Record the listing in the database (the cursor moves over seqs the agent does not
        have); return the events still to collect."""
        missing: list[EventRecord] = []
        for record in listed:
            if record.device_id != device_id:
                logger.warning(
                    "%s: listing holds an event of %s; ignored", device_id, record.device_id
                )
                continue
            state = await asyncio.to_thread(self._db.record_end, record)
            if state == "failed":
                await asyncio.to_thread(self._db.reset_attempts, record.event_id)
                state = "pending"
            if state == "pending":
                missing.append(record)
        if listed:
            self._last_seq[device_id] = max(self._last_seq.get(device_id, 0), listed[-1].seq)
            seqs = {r.seq for r in listed}
            absent = frozenset(range(since + 1, listed[-1].seq)) - seqs
            await asyncio.to_thread(self._db.advance_cursor, device_id, absent)
        return missing

    async def _ack_leftovers(self, device_id: str, client: AgentClient) -> None:
        """Ack what was archived but not acked (the agent or the connection was away)."""
        for row in await asyncio.to_thread(self._db.unacked, device_id):
            try:
                await client.ack(row.event_id)
            except RequestError as exc:
                if exc.code != ErrorCode.UNKNOWN_EVENT:
                    logger.warning("%s: ack of %s refused: %s", device_id, row.event_id, exc)
                    continue
            await asyncio.to_thread(self._db.mark_acked, row.event_id)

    # -- jobs -----------------------------------------------------------------------------------

    def _link(self, device_id: str) -> DeviceLink:
        link = self._links.get(device_id)
        if link is None:
            link = self._links[device_id] = DeviceLink(device_id, self._settings, self._url_of)
        return link

    def _wake_jobs(self, device_id: str) -> None:
        """Jobs of the device waiting out a retry backoff try again now."""
        back = self._device_back.pop(device_id, None)
        if back is not None:
            back.set()

    async def _wait_to_retry(self, device_id: str, delay_s: float) -> None:
        """Sleep `delay_s`, or less if the device is back meanwhile (`_wake_jobs`)."""
        back = self._device_back.setdefault(device_id, asyncio.Event())
        await sleep_unless(back, delay_s)

    def _schedule(self, record: EventRecord) -> asyncio.Task[None] | None:
        """Start the job of `record` unless one is already running (dedup by event_id)."""
        if record.file is None:
            return None
        existing = self._jobs.get(record.event_id)
        if existing is not None:
            return existing
        task = asyncio.create_task(self._job(record), name=f"collect {record.event_id}")
        self._jobs[record.event_id] = task
        task.add_done_callback(self._job_done)
        self._progress.download_queued()
        return task

    def _job_done(self, task: asyncio.Task[None]) -> None:
        event_id = task.get_name().removeprefix("collect ")
        self._jobs.pop(event_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug or a database failure: say so; the next catch-up tries this event again.
            logger.error("collecting %s failed unexpectedly: %s", event_id, exc, exc_info=exc)

    async def _job(self, record: EventRecord) -> None:
        device_sem = self._per_device.setdefault(
            record.device_id, asyncio.Semaphore(self._config.max_downloads_per_device)
        )
        started = False
        while True:
            try:
                async with device_sem, self._global:
                    if self._stopping:
                        return
                    if not started:
                        started = True
                        self._progress.download_started()
                    current = asyncio.current_task()
                    assert current is not None
                    self._downloading.add(current)
                    try:
                        await self._collect_once(record)
                    finally:
                        self._downloading.discard(current)
            except _GoneError as exc:
                # Usually retention on the agent after another controller collected it, or a
                # file lost on the agent: nothing to retry.
                self.stats.gone += 1
                logger.warning("%s", exc)
                await asyncio.to_thread(
                    self._db.mark_attempt, record.event_id, str(exc), "unavailable"
                )
                self._progress.download_finished(False)
                return
            except _RetryError as exc:
                self.stats.failed_attempts += 1
                attempts = await asyncio.to_thread(self._db.mark_attempt, record.event_id, str(exc))
                if attempts >= self._config.max_attempts:
                    self.stats.given_up += 1
                    await asyncio.to_thread(self._db.set_state, record.event_id, "failed")
                    logger.error(
                        "%s: giving up on event %d (%s) after %d attempts: %s; the next "
                        "catch-up of the device tries again",
                        record.device_id,
                        record.seq,
                        record.event_id,
                        attempts,
                        exc,
                    )
                    self._progress.download_finished(False)
                    self._download_gave_up(record.device_id)
                    return
                if self._stopping:
                    return  # pending in the database: resumed at the next start
                delay = backoff_delay(
                    attempts - 1, self._config.retry_min_s, self._config.retry_max_s, self._rng
                )
                logger.warning(
                    "%s: event %d: %s; retry %d in %.1f s",
                    record.device_id,
                    record.seq,
                    exc,
                    attempts,
                    delay,
                )
                await self._wait_to_retry(record.device_id, delay)
            else:
                self._progress.download_finished(True, record.file.size_bytes if record.file else 0)
                return

    async def _collect_once(self, record: EventRecord) -> None:
        """One attempt; raises _RetryError or _GoneError, returns once archived."""
        assert record.file is not None
        archive = self._archive
        event = f"event {record.seq} ({record.event_id})"
        found = await asyncio.to_thread(archive.is_archived, record)
        if found is not None:
            # Archived earlier (a crash before the database noted it) or by another controller.
            await asyncio.to_thread(self._db.mark_archived, record.event_id, found, acked=False)
            self.stats.already_archived += 1
            return
        try:
            await asyncio.to_thread(archive.ensure_space, record.file.size_bytes)
            holder = await asyncio.to_thread(archive.claim, record.event_id)
        except ArchiveFullError as exc:
            raise _RetryError(str(exc)) from exc
        except ArchiveError as exc:
            raise _RetryError(str(exc)) from exc
        if holder is not None:
            raise _RetryError(f"{event} is being collected by {holder}")
        link = self._link(record.device_id)
        try:
            # Checked again under the claim: another controller may have finished it
            # (sidecar written, then claim released) between the first check and our claim.
            found = await asyncio.to_thread(archive.is_archived, record)
            if found is not None:
                await asyncio.to_thread(self._db.mark_archived, record.event_id, found, acked=False)
                self.stats.already_archived += 1
                return
            path = await self._download(link, record, event)
        finally:
            await asyncio.to_thread(archive.release, record.event_id)
        await asyncio.to_thread(self._db.mark_archived, record.event_id, path, acked=False)
        self.stats.archived += 1
        self.stats.archived_bytes += record.file.size_bytes
        logger.info("%s: archived %s", record.device_id, path)
        self._download_worked(record.device_id)
        await self._ack(link, record, event)

    async def _ack(self, link: DeviceLink, record: EventRecord, event: str) -> None:
        """Tell the agent it may delete its copy; a failure is repaired at the next catch-up."""
        try:
            client = await link.client()
            await client.ack(record.event_id)
        except ControllerError as exc:
            logger.warning(
                "%s: could not ack %s (acked at the next catch-up): %s",
                record.device_id,
                event,
                exc,
            )
            return
        await asyncio.to_thread(self._db.mark_acked, record.event_id)

    async def _download(self, link: DeviceLink, record: EventRecord, event: str) -> Path:
        assert record.file is not None
        try:
            directory = await asyncio.to_thread(self._archive.prepare_directory, record)
            client = await link.client()
            path = await client.download(record.event_id, directory, record.file)
            await asyncio.to_thread(self._archive.write_sidecar, path, record, link.url or "")
        except RequestError as exc:
            if exc.code in GONE_CODES:
                raise _GoneError(f"{record.device_id}: {event} cannot be collected: {exc}") from exc
            raise _RetryError(str(exc)) from exc
        except AuthenticationError as exc:
            await link.reset()
            raise _RetryError(
                f"{exc} (check SOUNDEDGE_CONTROLLER_WS_TOKEN / _WS_TOKENS for {record.device_id})"
            ) from exc
        except (AgentConnectionError, AgentProtocolError) as exc:
            await link.reset()
            raise _RetryError(str(exc)) from exc
        except TransferError as exc:
            raise _RetryError(f"{exc}; not archived") from exc
        except (ArchiveError, OSError) as exc:
            raise _RetryError(str(exc)) from exc
        return path
