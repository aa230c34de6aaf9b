"""Runtime changes (the MQTT `set` command's core): validated, all-or-nothing, persisted."""

import json
from pathlib import Path

import pytest

from edge.runtime import RuntimeChangeError, RuntimeConfig
from edge.settings import AgentSettings


def _runtime(tmp_path: Path) -> RuntimeConfig:
    return RuntimeConfig(AgentSettings(data_dir=tmp_path, device_id="pi"))


def test_valid_change_applies_notifies_and_persists(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    seen: list[float] = []
    runtime.add_listener(lambda s: seen.append(s.detector.threshold_db))
    runtime.apply({"detector": {"threshold_db": 12}, "enabled": False})
    assert runtime.settings.detector.threshold_db == 12
    assert runtime.settings.enabled is False
    assert seen == [12]
    restarted = _runtime(tmp_path)
    restarted.load()
    assert restarted.settings.detector.threshold_db == 12
    assert restarted.settings.enabled is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ([], "non-empty JSON object"),
        ({}, "non-empty JSON object"),
        ({"nonsense": 1}, "'nonsense' cannot be changed"),
        ({"mqtt": {"host": "evil"}}, "'mqtt.host' is not a setting"),
        ({"detector": {"threshold_db": "loud"}}, "'detector.threshold_db'"),
        ({"detector": {"threshold_db": "12"}}, "'detector.threshold_db'"),  # strict types
        ({"detector": {"threshold_db": 500}}, "less than or equal to 80"),
        ({"detector": {"no_such_knob": 1}}, "'detector.no_such_knob'"),
        ({"detector": 5}, "must be a JSON object"),
        ({"enabled": "yes"}, "'enabled' must be true or false"),
        ({"detector": {"threshold_db": 3, "release_db": 6}}, "release_db"),
        # all-or-nothing: a valid part does not apply when another part is invalid
        ({"enabled": False, "detector": {"threshold_db": -1}}, "'detector.threshold_db'"),
    ],
)
def test_invalid_change_is_refused_and_changes_nothing(
    tmp_path: Path, change: object, message: str
) -> None:
    runtime = _runtime(tmp_path)
    before = runtime.settings
    with pytest.raises(RuntimeChangeError) as caught:
        runtime.apply(change)
    assert message in str(caught.value)
    assert runtime.settings == before
    assert not (tmp_path / "state" / "runtime.json").exists()


def test_corrupt_persisted_changes_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "runtime.json").write_text(json.dumps({"detector": {"hang_s": -5}}))
    runtime = _runtime(tmp_path)
    runtime.load()
    assert runtime.settings.detector.hang_s == AgentSettings(data_dir=tmp_path).detector.hang_s


def test_runtime_pre_roll_must_fit_in_the_ring(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)  # default ring: 30 s
    with pytest.raises(RuntimeChangeError, match="must be shorter than the ring"):
        runtime.apply({"recording": {"pre_roll_s": 45.0}})
    assert runtime.settings.recording.pre_roll_s == 2.0
