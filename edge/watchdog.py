"""Readiness and liveness for systemd (`Type=notify`, `WatchdogSec=`).

`ServiceWatchdog` (the agent) says READY=1 once capture runs, or once it is waiting for a sound
card (the service is up without one; STATUS says so), then WATCHDOG=1 at half of
`$WATCHDOG_USEC`, but only while audio blocks keep going through the pipeline. If the audio
loop stalls (a blocked pipeline, a hung stream the capture supervisor did not catch, a frozen
event loop) the pings stop and systemd restarts the service after `WatchdogSec`. STOPPING=1 is
sent when the stop event is set.

`ServiceHeartbeat` is the same for a program without audio (the controller): READY=1 at start,
WATCHDOG=1 while its event loop runs (and an optional `alive()` check holds), STOPPING=1 at stop.

Both are no-ops outside systemd (no `$NOTIFY_SOCKET`), e.g. on a terminal or on Windows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from edge.aio import sleep_unless
from edge.sdnotify import SdNotifier, watchdog_interval_s
from edge.state import AgentState

logger = logging.getLogger(__name__)

# How often the state is looked at (readiness, STATUS) when there is no faster watchdog period.
POLL_S = 1.0


class ServiceWatchdog:
    """Tells systemd the agent is ready, and alive while its audio loop is."""

    def __init__(
        self,
        state: AgentState,
        stall_s: float,
        notifier: SdNotifier | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`stall_s`: seconds without a processed audio block, while capture runs, after which
        the loop counts as stalled. `interval_s` overrides half of `$WATCHDOG_USEC`."""
        self._state = state
        self._stall_s = stall_s
        self._notifier = notifier if notifier is not None else SdNotifier.from_environ()
        self._interval_s = interval_s if interval_s is not None else watchdog_interval_s()
        self._clock = clock
        self.ready_sent = False
        self.pings = 0
        self._running_since: float | None = None
        self._stalled = False
        self._status = ""

    def alive(self) -> bool:
        """Is the audio loop alive (or legitimately waiting for a sound card)?"""
        state = self._state
        if state.capture_state != "running":
            self._running_since = None
            self._stalled = False
            return state.capture_state != "stopped"
        now = self._clock()
        if self._running_since is None:
            self._running_since = now  # a (re)opened stream gets a full stall_s to deliver
        last = max(state.last_block_monotonic, self._running_since)
        stalled = now - last > self._stall_s
        if stalled != self._stalled:
            self._stalled = stalled
            if stalled:
                logger.error(
                    "audio loop stalled (no block processed for %.0f s): no longer pinging "
                    "the systemd watchdog",
                    self._stall_s,
                )
            else:
                logger.info("audio loop running again")
        return not stalled

    def describe(self) -> str:
        state = self._state
        if state.capture_state == "waiting_for_device":
            return f"waiting for a sound card: {state.capture_error or 'no input device'}"
        if state.capture_state == "running":
            if self._stalled:
                return f"audio stalled: no block processed for over {self._stall_s:g} s"
            events = f"; {state.events_recorded} events recorded" if state.events_recorded else ""
            return f"capturing from {state.device_name or 'the sound card'}{events}"
        return state.capture_state

    async def run(self, stop: asyncio.Event) -> None:
        notifier = self._notifier
        if not notifier.enabled:
            await stop.wait()
            return
        interval = self._interval_s
        poll_s = min(POLL_S, interval) if interval is not None else POLL_S
        last_ping = float("-inf")
        try:
            while not stop.is_set():
                alive = self.alive()
                status = self.describe()
                if not self.ready_sent:
                    if self._state.capture_state in ("running", "waiting_for_device"):
                        notifier.ready(status)
                        self.ready_sent = True
                        self._status = status
                elif status != self._status:
                    notifier.status(status)
                    self._status = status
                now = self._clock()
                if (
                    self.ready_sent
                    and alive
                    and interval is not None
                    and now - last_ping >= interval
                ):
                    notifier.watchdog()
                    self.pings += 1
                    last_ping = now
                await sleep_unless(stop, poll_s)
        finally:
            notifier.stopping("stopping: finishing the current file")
            notifier.close()


class ServiceHeartbeat:
    """READY=1 at start, WATCHDOG=1 while the event loop runs, STOPPING=1 at stop.

    For the controller: `tasks.create_task(ServiceHeartbeat(status=...).run(stop))`. The pings
    come from the event loop itself, so a blocked loop stops them; `alive` can add a check of
    its own (return False to let systemd restart the service).
    """

    def __init__(
        self,
        status: Callable[[], str] | None = None,
        alive: Callable[[], bool] | None = None,
        notifier: SdNotifier | None = None,
        interval_s: float | None = None,
    ) -> None:
        self._describe = status
        self._alive = alive
        self._notifier = notifier if notifier is not None else SdNotifier.from_environ()
        self._interval_s = interval_s if interval_s is not None else watchdog_interval_s()
        self.pings = 0

    async def run(self, stop: asyncio.Event) -> None:
        notifier = self._notifier
        if not notifier.enabled:
            await stop.wait()
            return
        status = self._describe() if self._describe is not None else "running"
        notifier.ready(status)
        interval = self._interval_s
        poll_s = min(POLL_S * 5, interval) if interval is not None else POLL_S * 5
        try:
            while not stop.is_set():
                if self._describe is not None:
                    new_status = self._describe()
                    if new_status != status:
                        notifier.status(new_status)
                        status = new_status
                if interval is not None and (self._alive is None or self._alive()):
                    notifier.watchdog()
                    self.pings += 1
                await sleep_unless(stop, poll_s)
        finally:
            notifier.stopping("stopping")
            notifier.close()
