"""Settings that can be changed while the agent runs (MQTT `set`), validated and persisted.

A change is validated with the same pydantic models as the settings, applied as a whole or not
at all, stored in `<data_dir>/state/runtime.json` so it survives a restart, and announced to
listeners (the detector, the publishers).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from edge.errors import SoundedgeError
from edge.fileio import write_atomically
from edge.settings import AgentSettings, ring_problem

logger = logging.getLogger(__name__)

# What `set` may change, by section; None means the whole section. Connection settings
# (broker, websocket, sound card) are deliberately absent: they need a restart.
CHANGEABLE: dict[str, frozenset[str] | None] = {
    "enabled": None,
    "detector": None,
    "recording": None,
    "mqtt": frozenset({"health_interval_s", "level_interval_s"}),
}


class RuntimeChangeError(SoundedgeError):
    """A requested change is not allowed or not valid; nothing was changed."""


SettingsListener = Callable[[AgentSettings], None]


class RuntimeConfig:
    """The effective settings: startup settings plus persisted runtime changes."""

    def __init__(self, settings: AgentSettings, state_path: Path | None = None) -> None:
        self._base = settings
        self._settings = settings
        self._overrides: dict[str, Any] = {}
        self._state_path = state_path or settings.data_dir / "state" / "runtime.json"
        self._listeners: list[SettingsListener] = []

    @property
    def settings(self) -> AgentSettings:
        return self._settings

    @property
    def overrides(self) -> dict[str, Any]:
        """The runtime changes in force (what `set` changed since the last reset)."""
        return copy.deepcopy(self._overrides)

    def add_listener(self, listener: SettingsListener) -> None:
        self._listeners.append(listener)

    def load(self) -> None:
        """Apply the persisted changes; a stale or corrupt file is logged and ignored."""
        try:
            stored = json.loads(self._state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.error("ignoring runtime settings in %s: %s", self._state_path, exc)
            return
        try:
            self._settings = self._merge(self._base, stored)
            self._overrides = stored
        except RuntimeChangeError as exc:
            logger.error("ignoring runtime settings in %s: %s", self._state_path, exc)

    def apply(self, change: Any) -> AgentSettings:
        """Validate and apply `change` (a JSON object); raise RuntimeChangeError if invalid."""
        new_settings = self._merge(self._settings, change)
        overrides = _deep_merge(self._overrides, change)
        write_atomically(
            self._state_path, json.dumps(overrides, indent=2, sort_keys=True).encode("utf-8")
        )
        self._overrides = overrides
        self._settings = new_settings
        for listener in self._listeners:
            listener(new_settings)
        return new_settings

    @staticmethod
    def _merge(current: AgentSettings, change: Any) -> AgentSettings:
        if not isinstance(change, dict) or not change:
            raise RuntimeChangeError("a change must be a non-empty JSON object")
        updates: dict[str, Any] = {}
        for key, value in change.items():
            if key not in CHANGEABLE:
                allowed = ", ".join(sorted(CHANGEABLE))
                raise RuntimeChangeError(
                    f"'{key}' cannot be changed at run time (allowed: {allowed})"
                )
            section = getattr(current, key)
            if not isinstance(section, BaseModel):
                updates[key] = _validate_scalar(current, key, value)
                continue
            if not isinstance(value, dict):
                raise RuntimeChangeError(f"'{key}' must be a JSON object")
            allowed_fields = CHANGEABLE[key] or frozenset(type(section).model_fields)
            for field_name in value:
                if field_name not in allowed_fields:
                    raise RuntimeChangeError(
                        f"'{key}.{field_name}' is not a setting that can be changed at run time"
                    )
            try:
                updates[key] = type(section).model_validate(
                    {**section.model_dump(), **value}, strict=True
                )
            except ValidationError as exc:
                raise RuntimeChangeError(_describe(key, exc)) from exc
        merged = current.model_copy(update=updates)
        if problem := ring_problem(merged.audio, merged.recording):
            raise RuntimeChangeError(problem)
        return merged


def _validate_scalar(current: AgentSettings, key: str, value: Any) -> Any:
    field = type(current).model_fields[key]
    annotation = field.annotation
    if annotation is bool and not isinstance(value, bool):
        raise RuntimeChangeError(f"'{key}' must be true or false (got {json.dumps(value)[:40]})")
    return value


def _describe(section: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (section, *err["loc"]))
        parts.append(f"'{loc}': {err['msg']}")
    return "; ".join(parts)


def _deep_merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
