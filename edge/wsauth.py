"""Token checks for the websocket channel: one per-device token, compared in constant time."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from edge.messages.ws import AUTH_SCHEME


def configured_token(token: SecretStr | None) -> bytes | None:
    """The device's token as bytes, or None when none is set (then every client is refused)."""
    if token is None:
        return None
    value = token.get_secret_value()
    return value.encode("utf-8") if value else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None if absent or another scheme."""
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != AUTH_SCHEME.lower():
        return None
    return value.strip()


def token_matches(expected: bytes | None, presented: str | None) -> bool:
    """True if `presented` is the device's token. Constant time in the token's content."""
    if expected is None or presented is None:
        return False
    return hmac.compare_digest(expected, presented.encode("utf-8", errors="replace"))
