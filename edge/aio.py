"""Small asyncio helpers shared by the agent and the controller."""

from __future__ import annotations

import asyncio
import contextlib


async def sleep_unless(stop: asyncio.Event, seconds: float | None) -> None:
    """Sleep `seconds` (None: until stopped), or less if `stop` is set meanwhile.

    A timeout around the wait itself, not `wait_for`: that would start a task per sleep, and
    the agent's supervisors sleep like this for as long as it lives.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
