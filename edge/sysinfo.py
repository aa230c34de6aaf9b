"""Small system readings for health: the agent's CPU use, load and the SoC temperature."""

from __future__ import annotations

import os
import time
from pathlib import Path

# The Raspberry Pi (and most ARM boards) report the SoC temperature in millidegrees here.
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")


class CpuMeter:
    """CPU used by this process between two readings, in % of one core."""

    def __init__(self) -> None:
        self._cpu_s = time.process_time()
        self._wall_s = time.monotonic()

    def percent(self) -> float | None:
        cpu_s, wall_s = time.process_time(), time.monotonic()
        elapsed = wall_s - self._wall_s
        used = cpu_s - self._cpu_s
        self._cpu_s, self._wall_s = cpu_s, wall_s
        if elapsed <= 0.0:
            return None
        return round(100.0 * used / elapsed, 1)


def load_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # Windows has no load average
        return None


def soc_temperature_c(path: Path = THERMAL_ZONE) -> float | None:
    """The SoC temperature in °C, or None where the machine does not report one."""
    try:
        return round(int(path.read_text(encoding="ascii").strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None
