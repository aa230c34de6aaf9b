"""A tiny sd_notify client: tells systemd a service is ready, alive, or stopping.

systemd passes the datagram socket in `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
namespace) to a `Type=notify` service, and the watchdog period in `$WATCHDOG_USEC`. Without the
variable (a terminal, Docker, Windows) every call is a no-op, so callers never check where they
run. Sending never raises and never blocks: systemd being away must not stop the service.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _socket_address(value: str) -> str | None:
    """The `sendto` address for a `$NOTIFY_SOCKET` value, or None if it is not a unix socket."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. `vsock:` (systemd ≥ 254, for virtual machines): not supported here


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send WATCHDOG=1: half of `$WATCHDOG_USEC`, or None without a watchdog.

    As sd_watchdog_enabled(3): `$WATCHDOG_PID`, when set, must name this process.
    """
    env = os.environ if environ is None else environ
    raw = env.get(WATCHDOG_USEC_ENV, "")
    pid = env.get(WATCHDOG_PID_ENV)
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class SdNotifier:
    """Sends sd_notify(3) messages to `$NOTIFY_SOCKET`; does nothing when it is absent."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SdNotifier:
        env = os.environ if environ is None else environ
        value = env.get(NOTIFY_SOCKET_ENV, "")
        if sys.platform == "win32" or not value:
            return cls(None)
        address = _socket_address(value)
        if address is None:
            logger.warning(
                "%s=%r is not a unix socket; not notifying systemd", NOTIFY_SOCKET_ENV, value
            )
        return cls(address)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; True if it was sent."""
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", errors="replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:  # say it once: a missing socket stays missing
                logger.warning("cannot notify systemd at %s: %s", self._address.lstrip("\0"), exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def status(self, status: str) -> bool:
        return self.notify(*_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(status: str | None) -> list[str]:
    if status is None:
        return []
    # One line: a newline would start a new assignment.
    return ["STATUS=" + " ".join(status.split())[:200]]
