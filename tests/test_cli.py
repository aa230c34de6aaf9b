"""The `soundedge` commands as a user runs them (subprocesses), and the README's command list."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.fixtures.agent_process import clean_env, python_probe
from tests.fixtures.virtual_mic import VirtualMic

ROOT = Path(__file__).resolve().parents[1]


def _soundedge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], env=clean_env(), cwd=cwd,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _two_bursts(path: Path) -> None:
    rate = 48000
    rng = np.random.default_rng(3)
    signal = (rng.standard_normal(6 * rate) * 1e-3).astype(np.float32)
    t = np.arange(int(0.4 * rate)) / rate
    for start_s in (1.5, 4.0):
        start = int(start_s * rate)
        signal[start : start + t.size] += 0.3 * np.sin(2 * np.pi * 1500 * t).astype(np.float32)
    sf.write(path, signal, rate)


def test_detect_jsonl_prints_one_event_per_line_with_contract_fields(tmp_path: Path) -> None:
    audio = tmp_path / "two.wav"
    _two_bursts(audio)
    result = _soundedge("detect", str(audio), "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 2
    for event, true_onset in zip(events, (1.5, 4.0), strict=True):
        assert {"onset_s", "offset_s", "peak_dbfs"} <= event.keys()
        assert event["onset_s"] == pytest.approx(true_onset, abs=0.015)
        assert event["offset_s"] == pytest.approx(true_onset + 0.4, abs=0.05)


def test_detect_table_and_missing_file(tmp_path: Path) -> None:
    audio = tmp_path / "two.wav"
    _two_bursts(audio)
    table = _soundedge("detect", str(audio))
    assert table.returncode == 0
    assert "onset_s" in table.stdout
    assert "2 events" in table.stderr
    missing = _soundedge("detect", str(tmp_path / "nope.wav"))
    assert missing.returncode == 2
    assert "nope.wav" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.system
def test_devices_lists_the_capture_device_by_name(virtual_mic: VirtualMic) -> None:
    result = _soundedge("devices")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s*\*?\s+\d+\s+\d+\s+\d+\s+ALSA\s+pulse$", result.stdout, re.MULTILINE)
    assert "default input" in result.stdout


def test_every_readme_command_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"^\s*\./(scripts/\S+\.sh)$", readme, re.MULTILINE):
        assert (ROOT / script).is_file(), script
    commands = set(re.findall(r"`soundedge (\w+)", readme))
    assert commands >= {"devices", "record", "level", "detect", "run", "config"}
    for command in sorted(commands):
        result = _soundedge(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
    controller_commands = set(re.findall(r"`soundedge-controller (\w+)", readme))
    controller_commands |= set(re.findall(r"/ `(\w+)", readme))
    assert {"run", "devices", "events", "fetch", "tail", "set"} <= controller_commands
    for command in sorted(controller_commands):
        result = subprocess.run(
            [sys.executable, "-m", "controller", command, "--help"], env=clean_env(),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr)


def test_version_is_printed_on_stdout() -> None:
    result = _soundedge("--version")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"soundedge \S+\n", result.stdout)


def test_detect_starts_without_the_capture_stack() -> None:
    # `soundedge detect` is a batch tool: PortAudio, the capture module and the agent are left
    # out of its start-up (docs/benchmarks.md, "Detection cost").
    probe = (
        "import sys, edge.cli, edge.detect_file; "
        "print(sorted(m for m in ('edge.capture', 'sounddevice', 'edge.agent') "
        "if m in sys.modules))"
    )
    assert python_probe(probe).strip() == "[]"


def test_numpy_starts_no_blas_thread_pool_unless_the_user_asks() -> None:
    # OpenBLAS would start a thread per core on `import numpy`, spinning while the process
    # starts; soundedge does no linear algebra (edge/__init__.py).
    probe = (
        "import os, edge, numpy; "
        "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))"
    )
    # The setting, and the main thread alone.
    assert python_probe(probe).split() == ["1", "1"]
    assert python_probe(probe, OPENBLAS_NUM_THREADS="2").split()[0] == "2"
