"""Hostile environment: every agent and controller setting, given a value of the wrong type or
out of its range, is refused with one line that names the variable (issue 8). So is every
variable that holds a whole section or a mapping as JSON (SOUNDEDGE_AUDIO, ..._WS_TOKENS) when
it is not JSON, from the environment or from a .env file, down to the command line's exit 2.

The cases are generated from the settings models, so a new field is covered (or must be listed
in ACCEPTS_ANY_TEXT with the reason) without editing this file. Hand-picked cases and the exit
status of the command lines are in test_settings.py and test_controller_units.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from controller import settings as controller_settings
from edge import settings as agent_settings
from edge.errors import SettingsError

pytestmark = pytest.mark.usefixtures("no_soundedge_environment")

# Fields whose every string is a valid value as far as the settings are concerned: names,
# paths, URLs and secrets. What they point at is checked where it is used (tests named).
ACCEPTS_ANY_TEXT = {
    "SOUNDEDGE_CONFIG_FILE",  # test_a_missing_config_file_is_named below
    "SOUNDEDGE_DATA_DIR",  # test_capture_live.py::test_unusable_data_dir_is_a_clear_error
    "SOUNDEDGE_AUDIO__DEVICE",  # test_capture_live.py::test_missing_device_*
    "SOUNDEDGE_MQTT__USERNAME",  # test_mqtt_outage.py::test_wrong_credentials_*
    "SOUNDEDGE_MQTT__PASSWORD",
    "SOUNDEDGE_MQTT__CLIENT_ID",
    "SOUNDEDGE_MQTT__TLS_CA_FILE",  # test_mqtt_tls.py
    "SOUNDEDGE_MQTT__TLS_CERT_FILE",
    "SOUNDEDGE_MQTT__TLS_KEY_FILE",
    "SOUNDEDGE_WS__TOKEN",  # test_ws_handshake.py::test_no_token_configured_refuses_everyone
    "SOUNDEDGE_WS__PUBLIC_URL",
    "SOUNDEDGE_WS__TLS_CERT_FILE",  # test_ws_tls.py::test_unreadable_certificate_*
    "SOUNDEDGE_WS__TLS_KEY_FILE",
    "SOUNDEDGE_CONTROLLER_ARCHIVE_DIR",
    "SOUNDEDGE_CONTROLLER_DB_PATH",
    "SOUNDEDGE_CONTROLLER_WS_TOKEN",
    "SOUNDEDGE_CONTROLLER_MQTT__USERNAME",
    "SOUNDEDGE_CONTROLLER_MQTT__PASSWORD",  # test_controller_system.py::test_a_refused_mqtt_*
    "SOUNDEDGE_CONTROLLER_MQTT__TLS_CA_FILE",
    "SOUNDEDGE_CONTROLLER_MQTT__TLS_CERT_FILE",
    "SOUNDEDGE_CONTROLLER_MQTT__TLS_KEY_FILE",
}


@dataclass(frozen=True)
class Program:
    prefix: str
    root: type[BaseModel]
    load: Callable[[], Any]
    error: type[Exception]


AGENT = Program(
    agent_settings.ENV_PREFIX,
    agent_settings.AgentSettings,
    agent_settings.load_settings,
    SettingsError,
)
CONTROLLER = Program(
    controller_settings.ENV_PREFIX,
    controller_settings.ControllerSettings,
    controller_settings.load_settings,
    controller_settings.ControllerSettingsError,
)


@dataclass(frozen=True)
class Leaf:
    program: Program
    variable: str
    field: FieldInfo


def _is_model(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def leaves(program: Program) -> Iterator[Leaf]:
    def walk(model: type[BaseModel], path: list[str]) -> Iterator[Leaf]:
        for name, field in model.model_fields.items():
            if _is_model(field.annotation):
                yield from walk(typing.cast(type[BaseModel], field.annotation), [*path, name])
            else:
                variable = program.prefix + "__".join(p.upper() for p in [*path, name])
                yield Leaf(program, variable, field)

    yield from walk(program.root, [])


def _members(annotation: object) -> list[object]:
    """The alternatives of a union (Optional included), else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for m in typing.get_args(annotation) if m is not type(None)]
    return [annotation]


def wrong_type_value(field: FieldInfo) -> str | None:
    """A string that no alternative of the field's type accepts, or None if any text goes."""
    members = _members(field.annotation)
    literals = [m for m in members if typing.get_origin(m) is Literal]
    plain = [m for m in members if m not in literals]
    if all(m is bool for m in plain) and plain:
        return "maybe"
    if plain and all(m in (int, float) for m in plain):
        return "not-a-number"
    if literals and not plain:
        return "no-such-choice"
    if literals and all(m in (int, float) for m in plain):
        return "no-such-choice"
    if any(typing.get_origin(m) is dict for m in plain):
        return "not json"
    patterns = [getattr(m, "pattern", None) for m in field.metadata]
    if any(patterns) and str in plain:
        return " bad/value#+ "
    if any(isinstance(m, annotated_types.MinLen) for m in field.metadata):
        return ""
    if str in plain or Path in plain or SecretStr in plain:
        return None
    raise AssertionError(f"no wrong value known for {field.annotation}")


def out_of_range_values(field: FieldInfo) -> list[str]:
    values = []
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            values.append(str(bound.ge - 1))
        elif isinstance(bound, annotated_types.Gt):
            values.append(str(bound.gt))
        elif isinstance(bound, annotated_types.Le):
            values.append(str(bound.le + 1))
        elif isinstance(bound, annotated_types.Lt):
            values.append(str(bound.lt))
    return values


ALL_LEAVES = [*leaves(AGENT), *leaves(CONTROLLER)]
WRONG_TYPE = [
    pytest.param(leaf, value, id=leaf.variable)
    for leaf in ALL_LEAVES
    if (value := wrong_type_value(leaf.field)) is not None
]
OUT_OF_RANGE = [
    pytest.param(leaf, value, id=f"{leaf.variable}={value}")
    for leaf in ALL_LEAVES
    for value in out_of_range_values(leaf.field)
]


def refused_with_one_line(leaf: Leaf, value: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(leaf.variable, value)
    with pytest.raises(leaf.program.error) as caught:
        leaf.program.load()
    message = str(caught.value)
    assert "\n" not in message
    assert "Traceback" not in message
    return message


def test_every_setting_is_either_checked_or_listed_as_free_text() -> None:
    free = {leaf.variable for leaf in ALL_LEAVES if wrong_type_value(leaf.field) is None}
    assert free == ACCEPTS_ANY_TEXT
    assert len(WRONG_TYPE) + len(free) == len(ALL_LEAVES)


@pytest.mark.parametrize(("leaf", "value"), WRONG_TYPE)
def test_a_value_of_the_wrong_type_names_the_variable(
    leaf: Leaf, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = refused_with_one_line(leaf, value, monkeypatch)
    assert leaf.variable in message


@pytest.mark.parametrize(("leaf", "value"), OUT_OF_RANGE)
def test_a_value_out_of_range_names_the_variable(
    leaf: Leaf, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = refused_with_one_line(leaf, value, monkeypatch)
    assert leaf.variable in message


def test_a_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    leaf = next(leaf for leaf in ALL_LEAVES if leaf.variable == "SOUNDEDGE_CONFIG_FILE")
    message = refused_with_one_line(leaf, str(tmp_path / "absent.json"), monkeypatch)
    assert "SOUNDEDGE_CONFIG_FILE" in message


# -- variables that hold JSON: a whole section (SOUNDEDGE_AUDIO) or a mapping (..._WS_TOKENS) --


@dataclass(frozen=True)
class JsonVariable:
    program: Program
    variable: str


def json_variables(program: Program) -> Iterator[JsonVariable]:
    """The top-level fields that pydantic-settings decodes as JSON before validation."""
    for name, field in program.root.model_fields.items():
        if _is_model(field.annotation) or typing.get_origin(field.annotation) is dict:
            yield JsonVariable(program, program.prefix + name.upper())


JSON_VARIABLES = [*json_variables(AGENT), *json_variables(CONTROLLER)]
NOT_JSON = {
    "not-json": "notjson",
    "cut-short": '{"threshold_db":3',
    "single-quotes": "{'port': 1}",
    "empty": "",
}


def test_the_json_variables_are_the_sections_and_mappings() -> None:
    assert {v.variable for v in JSON_VARIABLES} == {
        "SOUNDEDGE_AUDIO", "SOUNDEDGE_DETECTOR", "SOUNDEDGE_RECORDING", "SOUNDEDGE_STORAGE",
        "SOUNDEDGE_MQTT", "SOUNDEDGE_WS",
        "SOUNDEDGE_CONTROLLER_WS_TOKENS", "SOUNDEDGE_CONTROLLER_WS_URLS",
        "SOUNDEDGE_CONTROLLER_MQTT", "SOUNDEDGE_CONTROLLER_COLLECTOR",
    }  # fmt: skip


def _assert_names_json_variable(message: str, item: JsonVariable, value: str) -> None:
    assert "\n" not in message
    assert "Traceback" not in message
    named = (f"{item.variable}:", f"{item.variable} (in the .env file):")
    assert message.startswith(named), message
    assert "JSON object" in message  # what is allowed
    if len(value) > 3:
        assert value not in message  # a mapping of tokens is not echoed


@pytest.mark.parametrize("value", NOT_JSON.values(), ids=NOT_JSON.keys())
@pytest.mark.parametrize("item", JSON_VARIABLES, ids=lambda v: v.variable)
def test_a_json_variable_that_is_not_json_names_the_variable(
    item: JsonVariable, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(item.variable, value)
    with pytest.raises(item.program.error) as caught:
        item.program.load()
    _assert_names_json_variable(str(caught.value), item, value)


@pytest.mark.parametrize("value", NOT_JSON.values(), ids=NOT_JSON.keys())
@pytest.mark.parametrize("item", JSON_VARIABLES, ids=lambda v: v.variable)
def test_a_json_variable_in_a_dotenv_file_that_is_not_json_names_the_variable(
    item: JsonVariable, value: str, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(f"{item.variable}={json.dumps(value)}\n", encoding="utf-8")
    with pytest.raises(item.program.error) as caught:
        item.program.load()
    message = str(caught.value)
    _assert_names_json_variable(message, item, value)
    assert "(in the .env file)" in message


def test_a_json_variable_that_is_json_of_the_wrong_shape_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for item in JSON_VARIABLES:
        monkeypatch.setenv(item.variable, "[1, 2]")
        with pytest.raises(item.program.error) as caught:
            item.program.load()
        assert str(caught.value).startswith(item.variable + ":"), caught.value
        monkeypatch.delenv(item.variable)


COMMANDS = {AGENT.prefix: ["edge", "config"], CONTROLLER.prefix: ["controller", "devices"]}


@pytest.mark.parametrize("in_dotenv", [False, True], ids=["environment", "dotenv"])
@pytest.mark.parametrize(
    "variable", ["SOUNDEDGE_DETECTOR", "SOUNDEDGE_CONTROLLER_MQTT"], ids=["agent", "controller"]
)
def test_the_command_line_exits_2_with_one_line_for_a_section_that_is_not_json(
    variable: str, in_dotenv: bool, tmp_path: Path
) -> None:
    item = next(v for v in JSON_VARIABLES if v.variable == variable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDEDGE_")}
    if in_dotenv:
        (tmp_path / ".env").write_text(f"{variable}='{{\"x\":3'\n", encoding="utf-8")
    else:
        env[variable] = '{"x":3'
    module, command = COMMANDS[item.program.prefix]
    result = subprocess.run(
        [sys.executable, "-m", module, command],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr
