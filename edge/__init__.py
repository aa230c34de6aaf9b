"""soundedge edge agent: capture, detect and record sound events, report them over MQTT."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    __version__: str


def __getattr__(name: str) -> str:
    # `__version__` is looked up on first use: importlib.metadata costs ~25 ms of start-up, and
    # `soundedge detect` never needs it (docs/benchmarks.md, "Detection cost").
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        found = version("soundedge")
    except PackageNotFoundError:  # running from a source tree that was not installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
