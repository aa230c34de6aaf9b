"""docs/configuration.md is generated from the settings models and must not go stale."""

from pathlib import Path

from edge.configdoc import render

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_matches_the_settings_models() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/configuration.md is stale: run `python -m edge.configdoc > docs/configuration.md`"
    )


def test_reference_lists_the_public_contract_variables() -> None:
    text = render()
    for variable in (
        "SOUNDEDGE_DEVICE_ID", "SOUNDEDGE_DATA_DIR", "SOUNDEDGE_AUDIO__DEVICE",
        "SOUNDEDGE_AUDIO__SAMPLERATE", "SOUNDEDGE_MQTT__HOST", "SOUNDEDGE_MQTT__PORT",
        "SOUNDEDGE_MQTT__USERNAME", "SOUNDEDGE_MQTT__PASSWORD", "SOUNDEDGE_MQTT__TOPIC_PREFIX",
        "SOUNDEDGE_WS__HOST", "SOUNDEDGE_WS__PORT", "SOUNDEDGE_WS__TOKEN",
    ):  # fmt: skip
        assert f"`{variable}`" in text, variable
