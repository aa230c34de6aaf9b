"""In-process notifications from the pipeline to the publishers (MQTT, websocket clients).

The bus is only a wake-up: it never holds the only copy of anything. The event log in the store
is the truth, so a subscriber that falls behind (its bounded queue overflowed) resynchronises
from the store by `seq` instead of making the pipeline wait.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from edge.messages.common import EventRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EventStarted:
    """The detector fired: an event is open and its file is being written."""

    event_id: str
    seq: int
    onset_time: datetime
    level_dbfs: float
    noise_floor_dbfs: float


@dataclass(frozen=True, slots=True)
class EventFinished:
    """The event's file is complete, verified and recorded in the event log."""

    record: EventRecord


AgentEvent = EventStarted | EventFinished


class Subscription:
    """A bounded queue of agent events; `overflowed` tells the reader it missed some."""

    def __init__(self, name: str, maxsize: int) -> None:
        self.name = name
        self.queue: asyncio.Queue[AgentEvent] = asyncio.Queue(maxsize)
        self.overflowed = False

    async def get(self) -> AgentEvent:
        return await self.queue.get()


class EventBus:
    """Fan-out of `AgentEvent`s to bounded per-subscriber queues. Loop thread only."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    def subscribe(self, name: str, maxsize: int = 256) -> Subscription:
        subscription = Subscription(name, maxsize)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def publish(self, event: AgentEvent) -> None:
        for subscription in self._subscriptions:
            try:
                subscription.queue.put_nowait(event)
            except asyncio.QueueFull:
                if not subscription.overflowed:
                    logger.warning(
                        "subscriber %s is behind; it will resync from the event log",
                        subscription.name,
                    )
                subscription.overflowed = True
