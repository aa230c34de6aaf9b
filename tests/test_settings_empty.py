"""An empty value (`VAR=`) means what docs/configuration.md and systemd/*.env.example say.

The examples show every variable with its default, blank where the default is "not set", and
tell users to uncomment a line and change it: a blank line uncommented as it stands must give
the documented meaning (None, or the computed default), never Path("."), an empty user name or
a traceback. A field where empty cannot mean anything refuses it with one line naming it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from controller import settings as controller_settings
from edge import settings as agent_settings
from tests.test_hostile_env import AGENT, CONTROLLER, Program

pytestmark = pytest.mark.usefixtures("no_soundedge_environment")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "systemd").glob("*.env.example"))


@dataclass(frozen=True)
class Leaf:
    program: Program
    variable: str
    path: tuple[str, ...]
    field: FieldInfo

    def value(self, settings: object) -> object:
        for name in self.path:
            settings = getattr(settings, name)
        return settings


def _leaves(program: Program) -> Iterator[Leaf]:
    def walk(model: type[BaseModel], path: tuple[str, ...]) -> Iterator[Leaf]:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from walk(annotation, (*path, name))
            else:
                variable = program.prefix + "__".join(p.upper() for p in (*path, name))
                yield Leaf(program, variable, (*path, name), field)

    yield from walk(program.root, ())


LEAVES = {leaf.variable: leaf for program in (AGENT, CONTROLLER) for leaf in _leaves(program)}


def _blank_example_lines() -> list[str]:
    """Every `#VAR=` line with nothing after the `=` in systemd/*.env.example."""
    found = []
    for path in EXAMPLES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if match := re.fullmatch(r"#(SOUNDEDGE_[A-Z0-9_]+)=", line):
                found.append(match[1])
    return found


BLANK = _blank_example_lines()


def _optional(field: FieldInfo) -> bool:
    annotation = field.annotation
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)


def _mentions_empty(field: FieldInfo) -> bool:
    return re.search(r"\bempty\b", field.description or "", flags=re.IGNORECASE) is not None


def _load_with(leaf: Leaf, source: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    if source == "environment":
        monkeypatch.setenv(leaf.variable, "")
    else:  # a .env file in the working directory, as the examples' lines are written
        Path(".env").write_text(f"{leaf.variable}=\n", encoding="utf-8")
    return leaf.program.load()


def test_the_examples_have_blank_lines_and_every_one_is_a_setting() -> None:
    assert len(EXAMPLES) == 2
    assert "SOUNDEDGE_MQTT__TLS_CA_FILE" in BLANK
    assert "SOUNDEDGE_CONTROLLER_DB_PATH" in BLANK
    assert set(BLANK) <= set(LEAVES)


@pytest.mark.parametrize("source", ["environment", "dotenv"])
@pytest.mark.parametrize("variable", BLANK)
def test_a_blank_example_line_uncommented_gives_the_default(
    variable: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaf = LEAVES[variable]
    default = leaf.value(leaf.program.load())
    value = leaf.value(_load_with(leaf, source, monkeypatch))
    assert value == default
    assert value not in ("", Path())
    if _optional(leaf.field) and leaf.field.default is None:
        assert value is None


@pytest.mark.parametrize("source", ["environment", "dotenv"])
@pytest.mark.parametrize(
    "variable", [v for v, leaf in LEAVES.items() if _optional(leaf.field) or v in BLANK]
)
def test_empty_is_none_for_every_optional_field(
    variable: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also for an optional field whose default is not None: SOUNDEDGE_DETECTOR__HIGHPASS_HZ=
    turns the filter off ("empty: off"), it does not restore 100 Hz."""
    leaf = LEAVES[variable]
    value = leaf.value(_load_with(leaf, source, monkeypatch))
    if _optional(leaf.field):
        assert value is None
    else:  # the ids: empty is the computed default (the host name)
        assert isinstance(value, str)
        assert value


def test_every_description_that_speaks_of_empty_is_about_a_field_where_empty_means_it() -> None:
    speaking = {v for v, leaf in LEAVES.items() if _mentions_empty(leaf.field)}
    assert "SOUNDEDGE_DETECTOR__HIGHPASS_HZ" in speaking
    assert speaking <= {v for v, leaf in LEAVES.items() if _optional(leaf.field)} | set(BLANK)


@pytest.mark.parametrize("variable", list(LEAVES))
def test_empty_is_never_taken_silently_as_a_wrong_value(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every setting, blank in the examples or not: empty gives None or the default, or is
    refused with one line naming the variable."""
    leaf = LEAVES[variable]
    default = leaf.value(leaf.program.load())
    monkeypatch.setenv(variable, "")
    try:
        value = leaf.value(leaf.program.load())
    except leaf.program.error as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith(variable + ":"), message
        return
    assert value is None or value == default
    assert value not in ("", Path())


def test_the_documented_meanings_of_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable in BLANK:
        monkeypatch.setenv(variable, "")
    monkeypatch.setenv("SOUNDEDGE_CONTROLLER_ARCHIVE_DIR", str(tmp_path))

    agent = agent_settings.load_settings()
    assert agent.config_file is None
    assert agent.device_id == agent_settings.AgentSettings.model_fields["device_id"].get_default(
        call_default_factory=True
    )  # the host name, made safe
    assert agent.audio.device is None  # the system default input
    assert agent.detector.lowpass_hz is None  # off
    assert agent.storage.hard_limit_mb == 1.5 * agent.storage.max_disk_mb
    assert agent.mqtt.username is None  # anonymous
    assert agent.mqtt.password is None
    assert agent.mqtt.client_id is None  # soundedge-<device_id>
    assert agent.mqtt.tls_ca_file is None  # the system's CAs
    assert agent.mqtt.tls_cert_file is None
    assert agent.mqtt.tls_key_file is None
    assert agent.ws.token is None  # refuses every client
    assert agent.ws.public_url is None
    assert agent.ws.tls_cert_file is None
    assert agent.ws.tls_key_file is None

    controller = controller_settings.load_settings()
    assert controller.controller_id == controller_settings.ControllerSettings().controller_id
    assert controller.db_path is None
    assert controller.database_path == tmp_path / "controller.db"
    assert controller.ws_token is None
    assert controller.token_for("pi1") is None
    assert controller.mqtt.username is None
    assert controller.mqtt.password is None
    assert controller.mqtt_client_id == controller.controller_id
    assert controller.mqtt.shared_group is None  # this controller takes every event
    assert controller.mqtt.tls_ca_file is None
    assert controller.mqtt.tls_cert_file is None
    assert controller.mqtt.tls_key_file is None


def test_highpass_empty_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUNDEDGE_DETECTOR__HIGHPASS_HZ", "")
    monkeypatch.setenv("SOUNDEDGE_DETECTOR__LOWPASS_HZ", "")
    detector = agent_settings.load_settings().detector
    assert detector.highpass_hz is None
    assert detector.lowpass_hz is None


@pytest.mark.parametrize("variable", ["SOUNDEDGE_DATA_DIR", "SOUNDEDGE_CONTROLLER_ARCHIVE_DIR"])
def test_an_empty_directory_is_refused_not_taken_as_the_working_directory(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaf = LEAVES[variable]
    monkeypatch.setenv(variable, "")
    with pytest.raises(leaf.program.error) as caught:
        leaf.program.load()
    assert str(caught.value).startswith(f"{variable}: must not be empty")


def test_the_agent_command_line_shows_blank_lines_as_not_set(tmp_path: Path) -> None:
    """`soundedge config` with every blank line of agent.env.example uncommented."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    env.update({v: "" for v in BLANK if v.startswith("SOUNDEDGE_") and LEAVES[v].program is AGENT})
    result = subprocess.run(
        [sys.executable, "-m", "edge", "config"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["config_file"] is None
    assert shown["mqtt"]["tls_ca_file"] is None
    assert shown["mqtt"]["username"] is None
    assert shown["storage"]["hard_max_disk_mb"] is None
    assert shown["detector"]["lowpass_hz"] is None
