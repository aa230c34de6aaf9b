"""The deployment docs work as written: audio-basics runs against the virtual microphone, and
the install commands and links the other guides give exist."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.fixtures.virtual_mic import DEVICE_NAME, VirtualMic

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MY_DOCS = ["architecture.md", "deploy-pi.md", "troubleshooting.md", "audio-basics.md", "windows.md"]
COMMAND_TIMEOUT_S = 60

# `scripts/x.sh --opt value \` continued lines included, up to the end of the command.
SCRIPT_CALL = re.compile(r"(scripts/[a-z-]+\.sh)((?:[ \t]+(?:\\\n\s*)?[^\s`|&;)]+)*)")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(doc: str, language: str) -> list[str]:
    text = (DOCS / doc).read_text(encoding="utf-8")
    return [body for lang, body in FENCE.findall(text) if lang == language]


def _console_script(name: str) -> str:
    """The console script next to this interpreter (a venv), else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _bursts(path: Path, samplerate: int, seconds: float = 12.0) -> Path:
    """A quiet room (noise at about -60 dBFS) with a 0.3 s 1 kHz burst every 1.5 s: whenever a
    recording starts, it hears some."""
    rng = np.random.default_rng(7)
    audio = (0.001 * rng.standard_normal(int(seconds * samplerate))).astype(np.float32)
    burst = 0.4 * np.sin(2 * np.pi * 1000 * np.arange(int(0.3 * samplerate)) / samplerate)
    for start_s in np.arange(0.5, seconds - 0.5, 1.5):
        start = int(start_s * samplerate)
        audio[start : start + burst.size] += burst
    sf.write(path, audio, samplerate, subtype="PCM_16")
    return path


def _run_sh_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command, _, comment = line.partition("#")
    argv = shlex.split(command)
    argv[0] = _console_script(argv[0])
    if "Ctrl-C" not in comment:
        return subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT_S, check=False,
        )  # fmt: skip
    # "Ctrl-C after a few seconds": wait until it records, then interrupt it like a user.
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    started = proc.stderr.readline()  # "recording a ring of ..." once the stream runs
    assert "recording" in started, started
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    return subprocess.CompletedProcess(argv, proc.returncode, out, started + err)


@pytest.mark.system
@pytest.mark.timeout(300)
@pytest.mark.skipif(sys.platform == "win32", reason="the virtual microphone is PulseAudio")
def test_audio_basics_commands_and_snippets_work(virtual_mic: VirtualMic, tmp_path: Path) -> None:
    env = {**os.environ, "SOUNDEDGE_AUDIO__DEVICE": DEVICE_NAME, "PYTHONPATH": str(REPO)}
    bursts = _bursts(tmp_path / "bursts.wav", virtual_mic.samplerate)
    commands = [
        line.strip()
        for block in blocks("audio-basics.md", "sh")
        for line in block.splitlines()
        if line.strip()
    ]
    assert any(c.startswith("soundedge devices") for c in commands)
    assert any(c.startswith("soundedge record --seconds 5 --out x.wav") for c in commands)
    assert any(c.startswith("soundedge level") for c in commands)
    for line in commands:
        player = virtual_mic.play(bursts, wait=False)
        try:
            result = _run_sh_line(line, tmp_path, env)
        finally:
            player.terminate()
            player.communicate(timeout=10)  # also closes its stderr pipe
        assert result.returncode == 0, f"`{line}` failed:\n{result.stdout}\n{result.stderr}"
        if line.startswith("soundedge devices"):
            assert DEVICE_NAME in result.stdout
        if line.startswith("soundedge level"):
            assert "dBFS" in result.stdout
        if line.startswith("soundedge detect"):
            found = re.search(r"(\d+) events", result.stderr)
            assert found, result.stderr
            assert int(found.group(1)) >= 1, result.stdout  # the recording heard the bursts
    for name in ("x.wav", "last.wav"):
        info = sf.info(tmp_path / name)
        assert info.frames > 0

    snippets = blocks("audio-basics.md", "python")
    assert len(snippets) >= 4
    for code in snippets:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=COMMAND_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"snippet failed:\n{code}\n{result.stderr}"
    assert sf.info(tmp_path / "one-second.wav").frames > 0


def _script_options(script: str) -> set[str]:
    result = subprocess.run(
        ["bash", str(REPO / script), "--help"], capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--[a-z][a-z-]*", result.stdout))


@pytest.mark.skipif(sys.platform == "win32", reason="the install scripts are bash")
def test_install_commands_in_the_docs_use_real_options() -> None:
    seen = 0
    for doc in MY_DOCS:
        text = (DOCS / doc).read_text(encoding="utf-8")
        for match in SCRIPT_CALL.finditer(text):
            script = match.group(1)
            assert (REPO / script).is_file(), f"{doc}: {script} does not exist"
            used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", match.group(2)))
            unknown = used - _script_options(script)
            assert not unknown, f"{doc}: {script} has no option {unknown}"
            seen += 1
    assert seen >= 5


def test_links_in_the_docs_resolve() -> None:
    for doc in MY_DOCS:
        text = (DOCS / doc).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (DOCS / target).resolve().exists(), f"{doc}: broken link {target}"
