"""The README's demo in its short CI mode: broker, virtual microphone, two agents, controller.

`scripts/demo.sh --short` itself checks that both agents' events were seen on MQTT, that every
event file reached the controller's archive with a matching sha256, and that everything
stopped cleanly (retained status `stopped`); this test checks its verdict and the archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(sys.platform == "win32", reason="the demo uses PulseAudio"),
]


@pytest.mark.timeout(240)
def test_demo_short_mode_sees_archives_and_verifies_events(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    # The commands of this interpreter's environment (no .venv set-up inside the test).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(REPO / "scripts/demo.sh"), "--short", "--no-setup", "--dir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=220,
        env=env,
        check=False,
    )
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        for log in sorted((workdir / "logs").glob("*.log"))
        if log.name != "mosquitto.log"
    )
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{logs}"
    assert "Demo OK" in result.stderr
    assert "files archived and verified" in result.stderr

    for device in ("demo-a", "demo-b"):
        archived = [
            p for p in (workdir / "archive" / device).glob("*/*.wav") if not p.name.startswith(".")
        ]
        assert archived, f"nothing archived for {device}"
        for path in archived:
            sidecar = json.loads(path.with_name(path.name + ".json").read_text())
            assert sidecar["file"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
