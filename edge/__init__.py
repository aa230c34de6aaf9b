"""soundedge edge agent: capture, detect and record sound events, report them over MQTT."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# soundedge does no linear algebra, yet numpy's OpenBLAS starts one thread per core when numpy is
# imported, and they spin while the process starts: ~0.09 s of CPU per `soundedge detect` on 2
# cores (docs/benchmarks.md, "Detection cost"), and idle threads in the agent. Set before any
# numpy import (every entry point imports this package first); a user's own value is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
