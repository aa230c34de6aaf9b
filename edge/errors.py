"""The agent's exceptions: one root, converted from library errors at the boundary."""


class SoundedgeError(Exception):
    """Root of every error the agent raises on purpose; its message is shown to the user."""


class SettingsError(SoundedgeError):
    """A setting (environment variable, config file, CLI flag) has an invalid value."""


class AudioDeviceError(SoundedgeError):
    """The sound card is missing, cannot be opened, or failed while running."""


class StorageError(SoundedgeError):
    """Event files or the event log cannot be written or read."""


class ProtocolError(SoundedgeError):
    """A wire message (MQTT payload, websocket frame) is malformed or not allowed."""
