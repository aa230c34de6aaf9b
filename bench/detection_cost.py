"""Detection cost: CPU seconds of `soundedge detect` over one hour of 48 kHz mono audio, against
`ffmpeg -af silencedetect` on the same file, in the same run, whole processes.

The hour is the benchmark scenes (`bench/scenes.py`) laid end to end, as 16-bit WAV in
`bench/out/`. Each command runs `--repeat` times, alternating, and the median CPU time (user +
system, from the kernel's accounting of the finished child) is reported.

The `edge` package is byte-compiled first, as pip does when it installs the agent (the
development checkout is an editable install, and with PYTHONDONTWRITEBYTECODE set every run
would compile the agent's source again: ~0.04 s per run).

    python3 -m bench.detection_cost
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf

import edge
from bench.scenes import OUT_DIR, SR, write_scenes

HOUR_FILE = OUT_DIR.parent / "hour_48k_mono.wav"
RESULT_FILE = OUT_DIR.parent / "detection_cost.json"
# ffmpeg's setting: the best single one from the quality benchmark (bench/out/ has it after a
# run of bench.detection_quality); the cost hardly depends on it.
FFMPEG_FILTER_DEFAULT = "silencedetect=noise=-30dB:d=0.1"


def make_hour() -> Path:
    """One hour of the scenes, end to end (written once)."""
    if HOUR_FILE.exists():
        return HOUR_FILE
    scenes = write_scenes()
    needed = 3600 * SR
    tmp = HOUR_FILE.with_suffix(".tmp.wav")
    written = 0
    with sf.SoundFile(tmp, "w", SR, 1, subtype="PCM_16") as out:
        while written < needed:
            for _, wav, _ in scenes:
                audio, _ = sf.read(wav, dtype="int16")
                take = audio[: needed - written]
                out.write(take)
                written += take.size
                if written >= needed:
                    break
    tmp.replace(HOUR_FILE)
    return HOUR_FILE


def run_timed(command: list[str]) -> tuple[float, str]:
    """Run a command to completion and return its CPU seconds (user + sys) and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Output goes to files (a full pipe would stall the child); wait4 reaps the child and
        # returns its own resource usage.
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode()
        if proc.returncode:
            stderr = err.read().decode()
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {stderr[-500:]}")
    return usage.ru_utime + usage.ru_stime, stdout


def ffmpeg_filter() -> str:
    quality = OUT_DIR.parent / "detection_quality.json"
    if quality.exists():
        best = json.loads(quality.read_text()).get("ffmpeg_best")
        if best:
            return f"silencedetect=noise={best['noise_db']}dB:d={best['d_s']}"
    return FFMPEG_FILTER_DEFAULT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    hour = make_hour()
    info = sf.info(str(hour))
    soundedge = shutil.which("soundedge")
    if soundedge is None:
        print("the soundedge command is not installed (pip install -e .)", file=sys.stderr)
        return 1
    compileall.compile_dir(Path(edge.__file__).parent, quiet=1)
    ours_cmd = [soundedge, "detect", str(hour), "--format", "jsonl"]
    ff_cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-i", str(hour),
        "-af", ffmpeg_filter(), "-f", "null", "-",
    ]  # fmt: skip
    ours: list[float] = []
    theirs: list[float] = []
    n_events = 0
    for _ in range(args.repeat):
        cpu, out = run_timed(ours_cmd)
        ours.append(cpu)
        n_events = sum(1 for line in out.splitlines() if line.startswith("{"))
        theirs.append(run_timed(ff_cmd)[0])
    result = {
        "audio_s": info.frames / info.samplerate,
        "soundedge_cmd": " ".join(ours_cmd),
        "ffmpeg_cmd": " ".join(ff_cmd),
        "soundedge_cpu_s": ours,
        "ffmpeg_cpu_s": theirs,
        "soundedge_median_s": statistics.median(ours),
        "ffmpeg_median_s": statistics.median(theirs),
        "ratio": statistics.median(ours) / statistics.median(theirs),
        "soundedge_events": n_events,
        "x_realtime_soundedge": info.frames / info.samplerate / statistics.median(ours),
    }
    RESULT_FILE.write_text(json.dumps(result, indent=1))
    print(f"| | CPU s (median of {args.repeat}) | runs | × real time |")
    print("|---|---|---|---|")
    for name, runs in (("soundedge detect", ours), ("ffmpeg silencedetect", theirs)):
        med = statistics.median(runs)
        shown = ", ".join(f"{r:.2f}" for r in runs)
        print(f"| {name} | {med:.2f} | {shown} | {result['audio_s'] / med:.0f} |")
    print(f"\nratio soundedge / ffmpeg: {result['ratio']:.2f} ({n_events} events found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
