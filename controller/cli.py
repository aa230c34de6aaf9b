"""`soundedge-controller` command line: parses arguments, loads settings, calls the commands.

Exit status: 0 success, 1 the operation failed (a device refused `set`, `fetch` could not
collect), 2 bad settings or arguments, 3 no answer in time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller import commands
from controller.errors import ControllerError
from controller.progress import TerminalProgress
from controller.settings import load_settings
from edge import __version__
from edge.logsetup import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soundedge-controller",
        description="soundedge controller: watch the fleet over MQTT and collect every event "
        "file into a local archive. Settings come from SOUNDEDGE_CONTROLLER_* environment "
        "variables (see docs/configuration.md); flags override them.",
    )
    parser.add_argument("--version", action="version", version=f"soundedge {__version__}")
    parser.add_argument("--archive-dir", type=Path, help="archive root directory")
    parser.add_argument("--db", type=Path, dest="db_path", help="SQLite database file")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="watch the fleet and collect every event file (until SIGTERM)")
    sub.add_parser(
        "devices",
        help="table of devices: status, last seen, level, noise floor, events today, disk "
        "free, outbox depth",
    )
    events = sub.add_parser("events", help="events known to the controller, newest first")
    events.add_argument("--device", help="only this device")
    events.add_argument(
        "--since", help="onset at or after: ISO time ('2026-11-25T12:00Z') or age ('2h', '30m')"
    )
    events.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    fetch = sub.add_parser("fetch", help="collect one event's file into the archive now")
    fetch.add_argument("event_id", metavar="EVENT_ID")
    tail = sub.add_parser("tail", help="print events live as devices report them")
    tail.add_argument("--device", help="only this device")
    tail.add_argument("--json", action="store_true", help="print the raw JSON messages")
    tail.add_argument(
        "--count",
        type=int,
        help="exit after this many messages (a start and an end count one each)",
    )
    setter = sub.add_parser(
        "set",
        help="change a device's runtime settings and wait for its confirmation or its error",
    )
    setter.add_argument("device", metavar="DEVICE")
    setter.add_argument(
        "assignments",
        metavar="KEY=VALUE",
        nargs="+",
        help="dotted key and JSON value, e.g. detector.threshold_db=8 enabled=false",
    )
    setter.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the answer"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in ("archive_dir", "db_path", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(**_overrides(args))
    except ControllerError as exc:
        print(f"soundedge-controller: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    progress = None
    if args.command == "run" and sys.stderr.isatty():
        # On a terminal: a status line with progress bars under the log lines.
        progress = TerminalProgress(sys.stderr)
        root = logging.getLogger()
        root.handlers[:] = [progress.handler(handler) for handler in root.handlers]
    try:
        return asyncio.run(commands.dispatch(args, settings, progress))
    except commands.UsageError as exc:
        print(f"soundedge-controller: error: {exc}", file=sys.stderr)
        return 2
    except ControllerError as exc:
        print(f"soundedge-controller: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
