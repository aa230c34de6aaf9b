"""soundedge edge agent: capture, detect and record sound events, report them over MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("soundedge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
