"""Deployment: the systemd units, the install/uninstall scripts and the environment examples.

The install scripts run for real into a scratch root (`--root`): a real virtual environment with
the package, users in the root's /etc/passwd, units enabled with `systemctl --root`; the units
are then checked with `systemd-analyze verify` against that root, as CI does.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from edge.settings import AgentSettings

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
SYSTEMD = REPO / "systemd"
UNITS = ["soundedge-agent.service", "soundedge-controller.service"]
INSTALL_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="systemd deployment is Linux only"),
    pytest.mark.timeout(INSTALL_TIMEOUT_S),
]
# Tests that install into a scratch root run pip (a package build): marked slow.
slow = pytest.mark.slow


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/install-system-deps.sh")


def make_root(path: Path) -> Path:
    """A scratch root with the host's user database and systemd's own units (for verify)."""
    (path / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), path / "etc" / name)
    system_units = Path("/usr/lib/systemd/system")
    if not system_units.is_dir():
        system_units = Path("/lib/systemd/system")
    shutil.copytree(system_units, path / "usr/lib/systemd/system", symlinks=True)
    return path


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOUNDEDGE_SKIP_APT": "1"}
    result = subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        env=env,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {args} failed ({result.returncode}):\n{result.stderr}")
    return result


# The package goes into the scratch venv without its dependencies (they come from the test's
# own environment through --system-site-packages): no download of numpy/scipy in CI.
FAST_PIP = ("--system-site-packages", "--pip-args", "--no-deps")


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Agent and controller installed into one scratch root."""
    _need("useradd", "systemctl", "systemd-analyze")
    root = make_root(tmp_path_factory.mktemp("root"))
    run_script(
        "install-agent.sh", "--root", str(root), "--device-id", "pi-kitchen",
        "--mqtt-host", "broker.lan", "--mqtt-password", "s3cret pass&word", "--ws-token", "tok-1",
        *FAST_PIP,
    )  # fmt: skip
    run_script(
        "install-controller.sh", "--root", str(root), "--mqtt-host", "broker.lan",
        "--ws-token", "tok-1", *FAST_PIP,
    )  # fmt: skip
    return root


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def _passwd(root: Path) -> dict[str, list[str]]:
    lines = (root / "etc/passwd").read_text().splitlines()
    return {line.split(":")[0]: line.split(":") for line in lines}


def _group_members(root: Path, group: str) -> list[str]:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == group:
            return [m for m in fields[3].split(",") if m]
    return []


@slow
def test_units_pass_systemd_analyze_verify(installed_root: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={installed_root}", *UNITS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify reports unknown keys and bad values as warnings with exit status 0: none allowed.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@slow
def test_units_are_hardened(installed_root: Path) -> None:
    for unit in UNITS:
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", f"--root={installed_root}", unit],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= 2.5, result.stdout


def test_units_have_the_required_settings() -> None:
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text()
        for required in (
            "Type=notify",
            "WatchdogSec=",
            "Restart=always",
            "RestartSec=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "StateDirectory=",
            "PrivateTmp=yes",
            "ProtectHome=yes",
            "EnvironmentFile=/etc/soundedge/",
        ):
            assert required in text, f"{unit} lacks {required}"
    agent = (SYSTEMD / "soundedge-agent.service").read_text()
    assert "SupplementaryGroups=audio" in agent
    assert "EnvironmentFile=/etc/soundedge/agent.env" in agent


@slow
def test_install_creates_user_venv_env_file_and_enabled_unit(installed_root: Path) -> None:
    root = installed_root
    users = _passwd(root)
    assert users["soundedge"][5] == "/var/lib/soundedge"
    assert users["soundedge"][6] == "/usr/sbin/nologin"
    assert "soundedge" in _group_members(root, "audio")
    assert "soundedge-controller" in users

    env_path = root / "etc/soundedge/agent.env"
    mode = env_path.stat().st_mode
    assert stat.S_IMODE(mode) == 0o640  # it holds the broker password
    soundedge_gid = int(_passwd(root)["soundedge"][3])
    assert env_path.stat().st_gid == soundedge_gid
    values = _env_file(env_path)
    assert values["SOUNDEDGE_DEVICE_ID"] == "pi-kitchen"
    assert values["SOUNDEDGE_MQTT__HOST"] == "broker.lan"
    assert values["SOUNDEDGE_MQTT__USERNAME"] == "pi-kitchen"
    assert values["SOUNDEDGE_MQTT__PASSWORD"] == "s3cret pass&word"
    assert values["SOUNDEDGE_WS__TOKEN"] == "tok-1"
    # Everything else stays commented, as in the example.
    example = (SYSTEMD / "agent.env.example").read_text()
    assert env_path.read_text().count("\n#SOUNDEDGE_") == example.count("\n#SOUNDEDGE_") - 6

    controller_values = _env_file(root / "etc/soundedge/controller.env")
    assert controller_values["SOUNDEDGE_CONTROLLER_WS_TOKEN"] == "tok-1"
    assert controller_values["SOUNDEDGE_CONTROLLER_MQTT__USERNAME"] == "controller"
    assert len(controller_values["SOUNDEDGE_CONTROLLER_MQTT__PASSWORD"]) >= 20  # generated

    wants = root / "etc/systemd/system/multi-user.target.wants"
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_text() == (SYSTEMD / unit).read_text()
        assert (wants / unit).is_symlink()
    assert (root / "opt/soundedge/docs/deploy-pi.md").is_file()  # Documentation= of the units

    for command in ("soundedge", "soundedge-controller"):
        version = subprocess.run(
            [str(root / "opt/soundedge/venv/bin" / command), "--version"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if command == "soundedge":
            assert version.returncode == 0, version.stderr
            assert "soundedge" in version.stdout


@slow
def test_install_again_keeps_settings_and_the_user(installed_root: Path) -> None:
    root = installed_root
    env_path = root / "etc/soundedge/agent.env"
    before = env_path.read_bytes()
    result = run_script(
        "install-agent.sh", "--root", str(root), "--device-id", "another-id", *FAST_PIP
    )
    assert "kept your /etc/soundedge/agent.env" in result.stderr
    assert env_path.read_bytes() == before
    passwd = (root / "etc/passwd").read_text()
    assert passwd.count("\nsoundedge:") + passwd.startswith("soundedge:") == 1
    assert _group_members(root, "audio").count("soundedge") == 1


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(root))] = (info.st_mode, info.st_size)
    return out


def test_dry_run_into_a_root_changes_nothing(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    before = _tree(root)
    passwd = (root / "etc/passwd").read_bytes()
    result = run_script("install-agent.sh", "--root", str(root), "--dry-run")
    assert _tree(root) == before
    assert (root / "etc/passwd").read_bytes() == passwd
    plan = result.stderr
    assert "+ useradd --prefix" in plan
    assert "-m venv" in plan
    assert "+ write /etc/soundedge/agent.env" in plan
    assert f"+ systemctl --root={root} enable soundedge-agent.service" in plan


def test_dry_run_on_this_system_shows_the_plan_and_changes_nothing() -> None:
    existed = Path("/etc/soundedge/agent.env").exists()
    result = run_script("install-agent.sh", "--dry-run", "--device-id", "pi-dry")
    plan = result.stderr
    assert "+ systemctl daemon-reload" in plan
    assert "+ systemctl enable soundedge-agent.service" in plan
    assert "+ systemctl restart soundedge-agent.service" in plan
    assert Path("/etc/soundedge/agent.env").exists() == existed
    controller = run_script("install-controller.sh", "--dry-run", "--no-start")
    assert "+ systemctl enable soundedge-controller.service" in controller.stderr
    assert "systemctl restart" not in controller.stderr
    uninstall = run_script("uninstall.sh", "--dry-run", "--purge")
    assert uninstall.returncode == 0


def test_bad_options_are_refused_with_one_line(tmp_path: Path) -> None:
    result = run_script("install-agent.sh", "--dry-run", "--device-id", "-bad", check=False)
    assert result.returncode != 0
    assert "--device-id" in result.stderr or "device id" in result.stderr
    result = run_script("install-agent.sh", "--frobnicate", check=False)
    assert result.returncode != 0
    assert "unknown option: --frobnicate" in result.stderr
    result = run_script("install-agent.sh", "--dry-run", "--mqtt-port", "x", check=False)
    assert "--mqtt-port" in result.stderr


@slow
def test_uninstall_keeps_data_unless_purged(installed_root: Path) -> None:
    root = installed_root
    state = root / "var/lib/soundedge"
    state.mkdir(parents=True, exist_ok=True)
    (state / "events.jsonl").write_text("{}\n")

    result = run_script("uninstall.sh", "--root", str(root), "--agent")
    assert not (root / "etc/systemd/system/soundedge-agent.service").exists()
    assert not (
        root / "etc/systemd/system/multi-user.target.wants/soundedge-agent.service"
    ).exists()
    assert (root / "etc/soundedge/agent.env").exists()
    assert (state / "events.jsonl").exists()
    assert "kept /etc/soundedge/agent.env" in result.stderr
    assert (root / "opt/soundedge/venv").is_dir()  # the controller still uses it

    run_script("uninstall.sh", "--root", str(root), "--purge")
    for gone in (
        "etc/systemd/system/soundedge-controller.service",
        "etc/soundedge",
        "var/lib/soundedge",
        "opt/soundedge",
    ):
        assert not (root / gone).exists(), gone
    assert "soundedge" not in _passwd(root)
    assert "soundedge-controller" not in _passwd(root)
    again = run_script("uninstall.sh", "--root", str(root), "--purge")  # idempotent
    assert "is not installed" in again.stderr


def _example_variables(path: Path) -> list[str]:
    return re.findall(r"^#?([A-Z][A-Z0-9_]+)=", path.read_text(), flags=re.MULTILINE)


def _settings_variables(model: type, prefix: str) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _settings_variables(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def test_env_examples_are_generated_from_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, str(SYSTEMD / "generate_env_examples.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_documented_variable_exists_and_every_setting_is_documented() -> None:
    agent_vars = _settings_variables(AgentSettings, "SOUNDEDGE_")
    documented = _example_variables(SYSTEMD / "agent.env.example")
    assert sorted(documented) == sorted(agent_vars)
    assert len(documented) == len(set(documented))

    controller_settings = pytest.importorskip("controller.settings")
    controller_vars = _settings_variables(
        controller_settings.ControllerSettings, "SOUNDEDGE_CONTROLLER_"
    )
    assert sorted(_example_variables(SYSTEMD / "controller.env.example")) == sorted(controller_vars)
    # What the scripts seed and the units set exists too.
    seeded = set()
    for name in ("install-agent.sh", "install-controller.sh"):
        seeded |= set(re.findall(r"\"(SOUNDEDGE_[A-Z0-9_]+)=", (SCRIPTS / name).read_text()))
    for unit in UNITS:
        seeded |= set(
            re.findall(r"^Environment=(SOUNDEDGE_[A-Z0-9_]+)=", (SYSTEMD / unit).read_text(), re.M)
        )
    assert seeded
    assert seeded <= agent_vars | controller_vars


def test_shell_scripts_pass_shellcheck() -> None:
    _need("shellcheck")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    result = subprocess.run(
        ["shellcheck", "-x", *scripts],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout
