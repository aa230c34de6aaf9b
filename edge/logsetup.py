"""Logging configuration, done once at a program's entry point.

Under systemd (journald adds its own time stamps and reads the level from the prefix) the format
is plain; on a terminal it carries the time.
"""

import logging
import os
import sys


def configure_logging(level: str) -> None:
    under_journald = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
    if under_journald:
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that are chatty at INFO: keep them to warnings unless debugging.
    if level != "DEBUG":
        for noisy in ("websockets", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
