"""Shared fixtures: real services started per test (see tests/fixtures/)."""

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from edge.store import EventStore
from tests.helpers import open_store

pytest_plugins = ["tests.fixtures.virtual_mic", "tests.fixtures.broker"]

# Bounded, deterministic property tests that tolerate a loaded 2-core CI machine.
settings.register_profile(
    "soundedge",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "soundedge"))


@pytest.fixture
def no_soundedge_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings as the code alone gives them: no SOUNDEDGE_ variable of the calling shell, and
    a working directory without a stray .env."""
    for key in list(os.environ):
        if key.startswith("SOUNDEDGE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def store_opener() -> Iterator[Callable[..., EventStore]]:
    """Opens real event stores and closes them all at the end of the test."""
    opened: list[EventStore] = []

    def opener(data_dir: Path, **storage: float) -> EventStore:
        store = open_store(data_dir, **storage)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()
