"""Settings: environment, config file, precedence and one-line errors (also via the CLI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.errors import SettingsError
from edge.settings import AgentSettings, load_settings

pytestmark = pytest.mark.usefixtures("no_soundedge_environment")


def test_nested_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUNDEDGE_AUDIO__SAMPLERATE", "44100")
    monkeypatch.setenv("SOUNDEDGE_MQTT__HOST", "broker.lan")
    monkeypatch.setenv("SOUNDEDGE_DEVICE_ID", "garden-pi")
    settings = load_settings()
    assert settings.audio.samplerate == 44100
    assert settings.mqtt.host == "broker.lan"
    assert settings.device_id == "garden-pi"


def test_defaults_match_the_design_contract() -> None:
    settings = load_settings()
    assert settings.mqtt.topic_prefix == "soundedge"
    assert settings.ws.port == 8765
    assert settings.recording.format == "wav"
    assert settings.recording.subtype == "PCM_16"


def test_environment_overrides_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "cfg_garden.json"
    config.write_text(json.dumps({"audio": {"samplerate": 32000, "channels": 2}}))
    monkeypatch.setenv("SOUNDEDGE_CONFIG_FILE", str(config))
    monkeypatch.setenv("SOUNDEDGE_AUDIO__SAMPLERATE", "16000")
    settings = load_settings()
    assert settings.audio.samplerate == 16000  # env wins
    assert settings.audio.channels == 2  # file still applies to the rest


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SOUNDEDGE_DEVICE_ID=from-dotenv\n")
    assert load_settings().device_id == "from-dotenv"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SOUNDEDGE_AUDIO__SAMPLERATE", "fast", "SOUNDEDGE_AUDIO__SAMPLERATE"),
        ("SOUNDEDGE_AUDIO__SAMPLERATE", "1000", "greater than or equal to 8000"),
        ("SOUNDEDGE_MQTT__PORT", "70000", "SOUNDEDGE_MQTT__PORT"),
        ("SOUNDEDGE_DEVICE_ID", "a/b", "SOUNDEDGE_DEVICE_ID"),
        ("SOUNDEDGE_RECORDING__FORMAT", "mp3", "'wav' or 'flac'"),
        ("SOUNDEDGE_MQTT__TOPIC_PREFIX", "a/#", "SOUNDEDGE_MQTT__TOPIC_PREFIX"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cross_field_rule_names_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUNDEDGE_RECORDING__FORMAT", "flac")
    monkeypatch.setenv("SOUNDEDGE_RECORDING__SUBTYPE", "FLOAT")
    with pytest.raises(SettingsError, match=r"SOUNDEDGE_RECORDING.*FLAC cannot store FLOAT"):
        load_settings()


def test_missing_and_malformed_config_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SettingsError, match="not valid JSON"):
        load_settings(config_file=bad)


def test_a_bad_value_from_the_config_file_is_named_as_its_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "cfg.json"
    config.write_text('{"audio": {"samplerate": "fast"}}')
    with pytest.raises(SettingsError) as caught:
        load_settings(config_file=config)
    assert str(caught.value).startswith(f"audio.samplerate in {config}: ")
    # The environment (or .env) overrides the file: then the bad value is the variable's.
    (tmp_path / ".env").write_text("SOUNDEDGE_AUDIO__SAMPLERATE=slow\n")
    with pytest.raises(SettingsError, match=r"^SOUNDEDGE_AUDIO__SAMPLERATE: .*'slow'"):
        load_settings(config_file=config)
    monkeypatch.setenv("SOUNDEDGE_AUDIO__SAMPLERATE", "quick")
    with pytest.raises(SettingsError, match=r"^SOUNDEDGE_AUDIO__SAMPLERATE: .*'quick'"):
        load_settings(config_file=config)


def test_secrets_are_masked_in_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUNDEDGE_MQTT__PASSWORD", "hunter2")
    monkeypatch.setenv("SOUNDEDGE_WS__TOKEN", "s3cret")
    settings = load_settings()
    dumped = json.dumps(settings.model_dump(mode="json"))
    assert "hunter2" not in dumped
    assert "s3cret" not in dumped
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "hunter2"


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_invalid_env_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = _cli(["config"], {"SOUNDEDGE_AUDIO__CHANNELS": "zero"}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "SOUNDEDGE_AUDIO__CHANNELS" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    result = _cli(
        ["config"], {"SOUNDEDGE_MQTT__PASSWORD": "hunter2", "SOUNDEDGE_DEVICE_ID": "pi7"}, tmp_path
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["device_id"] == "pi7"
    assert shown["mqtt"]["password"] == "**********"
    assert "hunter2" not in result.stdout


def test_settings_model_has_a_description_for_every_field() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += [f"{name}.{m}" for m in walk(annotation)]
            elif not field.description:
                missing.append(name)
        return missing

    assert walk(AgentSettings) == []


def test_pre_roll_longer_than_the_ring_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUNDEDGE_AUDIO__RING_BUFFERS", "4")
    monkeypatch.setenv("SOUNDEDGE_AUDIO__BUFFER_S", "0.5")
    monkeypatch.setenv("SOUNDEDGE_RECORDING__PRE_ROLL_S", "3")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("SOUNDEDGE_RECORDING__PRE_ROLL_S (3 s) must be shorter than the ring")
    assert "= 2 s" in message


def test_batching_longer_than_a_quarter_of_the_ring_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOUNDEDGE_AUDIO__RING_BUFFERS", "2")
    monkeypatch.setenv("SOUNDEDGE_AUDIO__BUFFER_S", "1")
    monkeypatch.setenv("SOUNDEDGE_RECORDING__PRE_ROLL_S", "0.5")
    monkeypatch.setenv("SOUNDEDGE_AUDIO__PROCESS_INTERVAL_S", "0.6")
    with pytest.raises(SettingsError, match="SOUNDEDGE_AUDIO__PROCESS_INTERVAL_S"):
        load_settings()
