"""Websocket sessions with the agents: one per device, opened on demand and reused.

A session that dropped is reopened by the next request; after a failed connect the next attempt
waits (capped, jittered backoff) so the jobs of an unreachable device queue up instead of
hammering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

from controller.errors import AgentConnectionError, AuthenticationError, ControllerError
from controller.settings import ControllerSettings
from controller.wsclient import AgentClient
from edge.aio import sleep_unless
from edge.mqtt_client import backoff_delay

UrlResolver = Callable[[str], str | None]


class DeviceLink:
    """The websocket session with one agent: opened on demand, reused, reopened after a drop.

    After a failed connect the next one waits (capped backoff), so jobs of an unreachable
    device queue up instead of hammering it.
    """

    def __init__(self, device_id: str, settings: ControllerSettings, url_of: UrlResolver) -> None:
        self.device_id = device_id
        self._settings = settings
        self._url_of = url_of
        self._client: AgentClient | None = None
        self._lock = asyncio.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._back = asyncio.Event()  # set by forget_backoff: a connect waiting goes now
        self._rng = random.Random()
        self.url: str | None = None

    async def client(self) -> AgentClient:
        async with self._lock:
            if self._client is not None and self._client.connected:
                return self._client
            await self._drop()
            url = self._url_of(self.device_id)
            if url is None:
                raise AgentConnectionError(
                    f"{self.device_id}: no websocket URL known yet (no info message; set "
                    "SOUNDEDGE_CONTROLLER_WS_URLS to override)"
                )
            loop = asyncio.get_running_loop()
            wait_s = self._retry_at - loop.time()
            if wait_s > 0:
                self._back.clear()
                await sleep_unless(self._back, wait_s)
            token = self._settings.token_for(self.device_id)
            if token is None:
                raise AuthenticationError(
                    f"{self.device_id}: no websocket token: set SOUNDEDGE_CONTROLLER_WS_TOKEN "
                    "or SOUNDEDGE_CONTROLLER_WS_TOKENS"
                )
            collector = self._settings.collector
            client = AgentClient(
                url,
                token,
                self._settings.controller_id,
                "pull",
                open_timeout_s=collector.open_timeout_s,
                request_timeout_s=collector.request_timeout_s,
                idle_timeout_s=collector.idle_timeout_s,
            )
            try:
                await client.connect()
                # A wrong URL (an override, a reused address) must not pass for the device.
                if client.welcome.device_id != self.device_id:
                    await client.close()
                    raise AgentConnectionError(
                        f"{url} answers as device {client.welcome.device_id!r}, not "
                        f"{self.device_id!r} (check its info message or "
                        "SOUNDEDGE_CONTROLLER_WS_URLS)"
                    )
            except ControllerError:
                self._failures += 1
                delay = backoff_delay(
                    self._failures - 1, collector.retry_min_s, collector.retry_max_s, self._rng
                )
                self._retry_at = loop.time() + delay
                raise
            self._failures = 0
            self._client = client
            self.url = url
            return client

    def forget_backoff(self) -> None:
        """The device is back (its status went online): the next connect, or one waiting out
        the backoff built up while it was down, goes at once."""
        self._failures = 0
        self._retry_at = 0.0
        self._back.set()

    async def reset(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(ControllerError, OSError):
                await client.close()
