"""Wall-clock helpers: every time on the wire is UTC ISO 8601 with milliseconds."""

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_utc(moment: datetime) -> str:
    """'2026-11-25T12:13:14.123Z'."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def compact_utc(moment: datetime) -> str:
    """'20261125T121314.123Z', for file names (sortable, no colons for Windows)."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y%m%dT%H%M%S.") + f"{moment.microsecond // 1000:03d}Z"


def from_timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
