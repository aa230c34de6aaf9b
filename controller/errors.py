"""The controller's exceptions: one root, converted from library errors at the boundary."""

from __future__ import annotations

from edge.messages.ws import ErrorCode


class ControllerError(Exception):
    """Root of every error the controller raises on purpose; its message is shown to the user."""


class AgentConnectionError(ControllerError):
    """The agent could not be reached, or the connection was lost."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class HandshakeError(AgentConnectionError):
    """The agent refused the session (wrong version, no hello in time, too many clients)."""

    def __init__(
        self, message: str, code: ErrorCode | None = None, close_code: int | None = None
    ) -> None:
        super().__init__(message, close_code)
        self.code = code


class AuthenticationError(HandshakeError):
    """The agent refused the token (or has none configured)."""


class RequestError(ControllerError):
    """The agent answered a request with an `error` message."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class TransferError(ControllerError):
    """A downloaded file failed verification (size, sha256) or its transfer broke off.

    The final file name is never left holding unverified data.
    """


class AgentProtocolError(ControllerError):
    """The agent sent something the protocol does not allow."""
