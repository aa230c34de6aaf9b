"""Shared fixtures: real services started per test (see tests/fixtures/)."""

import os

from hypothesis import HealthCheck, settings

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
