"""`soundedge` command line: parses arguments, loads settings, calls the commands module.

No logic lives here: flags only override settings (their defaults are the settings' defaults).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge import commands
from edge.errors import SoundedgeError
from edge.logsetup import configure_logging
from edge.settings import load_settings


class _VersionAction(argparse.Action):
    """`--version`: the version is looked up only when asked for (it costs start-up time)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from edge import __version__  # noqa: PLC0415

        print(f"soundedge {__version__}")  # to stdout, as argparse's own version action does
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soundedge",
        description="soundedge edge agent: capture, detect and record sound events, report over "
        "MQTT. Settings come from SOUNDEDGE_* environment variables (see docs/configuration.md); "
        "flags override them.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="show program's version number and exit"
    )
    parser.add_argument("--config", type=Path, help="JSON settings file (env vars override it)")
    parser.add_argument("--device", help="input device: index or part of its name")
    parser.add_argument("--data-dir", type=Path, help="directory for events and state")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("devices", help="list audio input devices")

    record = sub.add_parser(
        "record",
        help="record a fixed span (--seconds) or, without it, a ring of buffers until Ctrl-C",
    )
    record.add_argument("--out", type=Path, required=True, help="output file (.wav or .flac)")
    record.add_argument("--seconds", type=float, help="record this many seconds, then stop")
    record.add_argument("--buffers", type=int, help="ring mode: number of buffers")
    record.add_argument("--buffer-seconds", type=float, help="ring mode: seconds per buffer")
    record.add_argument(
        "--stop-after", type=float, help=argparse.SUPPRESS
    )  # ring mode, for tests: behave as if Ctrl-C came after this many seconds of audio

    level = sub.add_parser("level", help="live level meter (dBFS now, peak, noise floor)")
    level.add_argument("--seconds", type=float, help="stop after this many seconds")

    detect = sub.add_parser("detect", help="run the detector over an audio file")
    detect.add_argument("file", type=Path, help="audio file (WAV, FLAC, ...)")
    detect.add_argument("--format", choices=["jsonl", "table"], default="table")

    sub.add_parser("run", help="run the agent (capture, detect, record, report)")
    sub.add_parser("config", help="print the effective settings as JSON (secrets masked)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.config is not None:
        overrides["config_file"] = args.config
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    if args.device is not None:
        overrides["audio"] = {"device": args.device}
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(**_overrides(args))
    except SoundedgeError as exc:
        print(f"soundedge: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return commands.dispatch(args, settings)
    except SoundedgeError as exc:
        print(f"soundedge: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, commands.USAGE_ERRORS) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
