"""The agent's live state: what health reports and the watchdog checks. Loop thread only."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from edge.timeutil import utc_now

CaptureState = Literal["starting", "running", "waiting_for_device", "stopped"]
DeadInputReason = Literal["silent", "constant", "clipped"]


@dataclass
class AgentState:
    """Mutable snapshot of the running agent, updated by the pipeline and capture supervisor."""

    started_at: datetime = field(default_factory=utc_now)
    capture_state: CaptureState = "starting"
    device_name: str | None = None
    capture_error: str | None = None
    overflows: int = 0
    stream_restarts: int = 0
    frames_processed: int = 0
    frames_lost: int = 0  # the pipeline fell more than a ring behind (should stay 0)
    dead_input: DeadInputReason | None = None
    level_dbfs: float = float("-inf")
    peak_dbfs: float = float("-inf")
    noise_floor_dbfs: float = float("-inf")
    event_active: bool = False
    events_recorded: int = 0
    last_event_seq: int = 0
    clock_jumps: int = 0
    last_block_monotonic: float = 0.0  # time.monotonic() of the last processed block (watchdog)

    def uptime_s(self) -> float:
        return (utc_now() - self.started_at).total_seconds()
