"""Write systemd/agent.env.example and systemd/controller.env.example from the settings models.

    python3 systemd/generate_env_examples.py          # rewrite the examples
    python3 systemd/generate_env_examples.py --check  # exit 1 if one is stale (the tests do)

Every variable appears once, commented out, with its meaning and default, so the examples can
never list a variable that does not exist or miss one that does. A program whose settings
module cannot be imported (not installed) is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

HERE = Path(__file__).resolve().parent


class Program:
    def __init__(
        self,
        target: str,
        model_path: str,
        prefix: str,
        header: str,
        service_values: dict[str, tuple[str, str]],
        first_sections: tuple[str, ...],
    ) -> None:
        self.target = HERE / target
        self.model_path = model_path
        self.prefix = prefix
        self.header = header
        # Variables the unit sets with Environment=: shown value and a note.
        self.service_values = service_values
        self.first_sections = first_sections

    def model(self) -> type[BaseModel] | None:
        module_name, _, class_name = self.model_path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            return None
        model: type[BaseModel] | None = getattr(module, class_name, None)
        return model


AGENT_HEADER = """\
# soundedge edge agent: environment of the service, installed as /etc/soundedge/agent.env.
#
# Generated from the settings models by `python3 systemd/generate_env_examples.py`; do not edit
# the example by hand. The full reference is docs/configuration.md.
#
# Every variable is commented out and shows its default: remove the `#` in front of a variable
# and change its value to set it. scripts/install-agent.sh seeds the device id, the broker and
# the credentials. After a change: `sudo systemctl restart soundedge-agent`.
#
# systemd reads this file (EnvironmentFile=): one VAR=value per line, no `export`. It holds
# passwords: keep it readable by root and the service's group only (mode 0640, root:soundedge).
"""

CONTROLLER_HEADER = """\
# soundedge controller: environment of the service, installed as /etc/soundedge/controller.env.
#
# Generated from the settings models by `python3 systemd/generate_env_examples.py`; do not edit
# the example by hand. The full reference is docs/configuration.md.
#
# Every variable is commented out and shows its default: remove the `#` in front of a variable
# and change its value to set it. scripts/install-controller.sh seeds the broker and the
# credentials. After a change: `sudo systemctl restart soundedge-controller`.
#
# systemd reads this file (EnvironmentFile=): one VAR=value per line, no `export`. It holds
# passwords and tokens: keep it readable by root and the service's group only (mode 0640).
"""

STATE_NOTE = (
    "The service sets this (Environment= in the unit). Another directory also needs "
    "ReadWritePaths= in a drop-in (`systemctl edit`), since the service sees a read-only system."
)

PROGRAMS = [
    Program(
        "agent.env.example",
        "edge.settings:AgentSettings",
        "SOUNDEDGE_",
        AGENT_HEADER,
        {"SOUNDEDGE_DATA_DIR": ("/var/lib/soundedge", STATE_NOTE)},
        ("mqtt", "ws", "audio"),
    ),
    Program(
        "controller.env.example",
        "controller.settings:ControllerSettings",
        "SOUNDEDGE_CONTROLLER_",
        CONTROLLER_HEADER,
        {"SOUNDEDGE_CONTROLLER_ARCHIVE_DIR": ("/var/lib/soundedge-controller/archive", STATE_NOTE)},
        ("mqtt",),
    ),
]


def _is_section(field: FieldInfo) -> bool:
    annotation = field.annotation
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def env_value(value: Any) -> str:
    """A default as it would be written in the environment file."""
    if value is None or isinstance(value, SecretStr):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | Path):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def _default(field: FieldInfo) -> tuple[str, str | None]:
    """(value to show, note) for a field's default."""
    factory = field.default_factory
    if factory is not None:
        if factory in (dict, list, set, tuple) or (
            isinstance(factory, type) and issubclass(factory, BaseModel)
        ):
            return env_value(factory()), None
        # Computed on the machine it runs on (e.g. from the host name): no fixed value.
        return "", None if "host name" in (field.description or "") else "computed at start"
    if field.default is PydanticUndefined:
        return "", "required"
    return env_value(field.default), None


def _wrap(text: str, width: int = 96) -> list[str]:
    lines: list[str] = []
    line = "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    if line != "#":
        lines.append(line)
    return lines


def _variables(model: type[BaseModel], prefix: str, program: Program) -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        if _is_section(field):
            continue
        variable = f"{prefix}{name.upper()}"
        value, note = _default(field)
        description = field.description or name.replace("_", " ")
        if variable in program.service_values:
            value, note = program.service_values[variable]
        if note:
            description += f" ({note})" if not note.endswith(".") else " " + note
        out += [*_wrap(description), f"#{variable}={value}", ""]
    return out


def render(program: Program) -> str | None:
    model = program.model()
    if model is None:
        return None
    out = [program.header, "## General", ""]
    out += _variables(model, program.prefix, program)
    sections = [name for name, field in model.model_fields.items() if _is_section(field)]
    ordered = [s for s in program.first_sections if s in sections]
    ordered += [s for s in sections if s not in ordered]
    for name in ordered:
        annotation = model.model_fields[name].annotation
        assert isinstance(annotation, type)
        title = (annotation.__doc__ or name).strip().splitlines()[0]
        out += [f"## {name}: {title}", ""]
        out += _variables(annotation, f"{program.prefix}{name.upper()}__", program)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, exit 1 if stale")
    args = parser.parse_args(argv)
    stale = False
    for program in PROGRAMS:
        text = render(program)
        if text is None:
            print(f"skipped {program.target.name}: {program.model_path} not importable")
            continue
        current = program.target.read_text(encoding="utf-8") if program.target.exists() else ""
        if current == text:
            continue
        if args.check:
            print(f"{program.target.name} is stale: run python3 systemd/generate_env_examples.py")
            stale = True
        else:
            program.target.write_text(text, encoding="utf-8")
            print(f"wrote {program.target}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
