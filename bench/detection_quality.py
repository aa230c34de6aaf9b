"""Detection quality: soundedge's defaults against the best ffmpeg silencedetect setting.

Scenes come from `bench/scenes.py` (seeds in `bench/scenes_seeds.json`). Scoring is event-based
onset F1: detections and true events are matched one to one, closest onsets first, when their
onsets are within the collar (0.25 s). ffmpeg's silences are inverted into events (a silence end
is an onset) and its `noise` and `d` settings are searched over a grid; the single setting with
the best overall F1 is reported next to soundedge's defaults.

    python3 -m bench.detection_quality            # figures as markdown, JSON in bench/out/
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.scenes import OUT_DIR, SceneSpec, TruthEvent, write_scenes
from edge.detect_file import detect_file
from edge.settings import DetectorSettings

COLLAR_S = 0.25
FFMPEG_NOISE_DB = tuple(range(-40, -9, 2))
FFMPEG_D_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
RESULT_FILE = OUT_DIR.parent / "detection_quality.json"


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    onset_errors_s: list[float] = field(default_factory=list)

    def add(self, other: Score) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.onset_errors_s += other.onset_errors_s

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    @property
    def median_error_ms(self) -> float:
        return 1000 * statistics.median(self.onset_errors_s) if self.onset_errors_s else 0.0


def match(truth: list[TruthEvent], onsets: list[float]) -> tuple[Score, list[bool]]:
    """One-to-one matching within the collar, closest pairs first; also which truths were hit."""
    pairs = sorted(
        (abs(t.onset_s - o), i, j)
        for i, t in enumerate(truth)
        for j, o in enumerate(onsets)
        if abs(t.onset_s - o) <= COLLAR_S
    )
    used_t: set[int] = set()
    used_o: set[int] = set()
    errors = []
    for err, i, j in pairs:
        if i in used_t or j in used_o:
            continue
        used_t.add(i)
        used_o.add(j)
        errors.append(err)
    score = Score(len(used_t), len(onsets) - len(used_o), len(truth) - len(used_t), errors)
    return score, [i in used_t for i in range(len(truth))]


def soundedge_onsets(wav: Path, settings: DetectorSettings) -> list[float]:
    return [e.onset_s for e in detect_file(wav, settings)]


_SILENCE = re.compile(r"silence_(start|end): (-?[0-9.]+)")


def ffmpeg_onsets(wav: Path, noise_db: float, d_s: float) -> list[float]:
    """Onsets of non-silent stretches: each silence end (and the file start if not silent)."""
    proc = subprocess.run(
        [
            "ffmpeg", "-nostdin", "-hide_banner", "-i", str(wav),
            "-af", f"silencedetect=noise={noise_db}dB:d={d_s}", "-f", "null", "-",
        ],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    marks = [(m.group(1), float(m.group(2))) for m in _SILENCE.finditer(proc.stderr)]
    onsets = []
    if not marks or marks[0] != ("start", 0.0):
        onsets.append(0.0)
    onsets += [value for kind, value in marks if kind == "end"]
    return onsets


def score_all(
    scenes: list[tuple[SceneSpec, Path, list[TruthEvent]]], onsets: Iterable[list[float]]
) -> dict[str, Score]:
    """Scores overall ('all'), per SNR ('snr0'...), per background ('bg:white'...)."""
    table: dict[str, Score] = defaultdict(Score)
    for (spec, _, truth), found in zip(scenes, onsets, strict=True):
        score, _ = match(truth, found)
        for key in ("all", f"snr{spec.snr_db:g}", f"bg:{spec.background}"):
            table[key].add(score)
    return dict(table)


def recall_per_kind(
    scenes: list[tuple[SceneSpec, Path, list[TruthEvent]]], onsets: list[list[float]]
) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for (_, _, truth), found in zip(scenes, onsets, strict=True):
        _, hit = match(truth, found)
        for event, ok in zip(truth, hit, strict=True):
            hits[event.kind].append(ok)
    return {kind: sum(v) / len(v) for kind, v in sorted(hits.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ffmpeg", action="store_true", help="score soundedge only")
    parser.add_argument("--jobs", type=int, default=2, help="parallel ffmpeg runs")
    args = parser.parse_args(argv)

    scenes = write_scenes()
    settings = DetectorSettings()
    t0 = time.process_time()
    ours = [soundedge_onsets(wav, settings) for _, wav, _ in scenes]
    ours_cpu = time.process_time() - t0
    our_scores = score_all(scenes, ours)
    result: dict[str, object] = {
        "scenes": len(scenes),
        "events": sum(len(t) for _, _, t in scenes),
        "soundedge": {k: _as_dict(v) for k, v in our_scores.items()},
        "soundedge_recall_per_kind": recall_per_kind(scenes, ours),
        "soundedge_cpu_s": ours_cpu,
    }
    best: tuple[float, float, float] | None = None
    ff_scores: dict[str, Score] = {}
    if not args.no_ffmpeg:
        grid = [(n, d) for n in FFMPEG_NOISE_DB for d in FFMPEG_D_S]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for noise_db, d_s in grid:
                wavs = [wav for _, wav, _ in scenes]
                found = list(
                    pool.map(ffmpeg_onsets, wavs, [noise_db] * len(wavs), [d_s] * len(wavs))
                )
                scores = score_all(scenes, found)
                if best is None or scores["all"].f1 > best[0]:
                    best = (scores["all"].f1, noise_db, d_s)
                    ff_scores = scores
                    result["ffmpeg_recall_per_kind"] = recall_per_kind(scenes, found)
        assert best is not None
        result["ffmpeg_best"] = {"noise_db": best[1], "d_s": best[2]}
        result["ffmpeg"] = {k: _as_dict(v) for k, v in ff_scores.items()}
    RESULT_FILE.write_text(json.dumps(result, indent=1))
    print(_markdown(our_scores, ff_scores, best, result))
    return 0


def _as_dict(score: Score) -> dict[str, float]:
    return {
        "f1": round(score.f1, 4),
        "tp": score.tp,
        "fp": score.fp,
        "fn": score.fn,
        "median_onset_error_ms": round(score.median_error_ms, 1),
    }


def _markdown(
    ours: dict[str, Score],
    ff: dict[str, Score],
    best: tuple[float, float, float] | None,
    result: dict[str, object],
) -> str:
    keys = ["all"] + [f"snr{s}" for s in (0, 6, 12, 20)] + sorted(k for k in ours if k[:3] == "bg:")
    head = "| scenes | events | soundedge F1 (TP/FP/FN) | median onset error |"
    sep = "|---|---|---|---|"
    if best is not None:
        head += f" ffmpeg F1 (noise={best[1]:g}dB:d={best[2]:g}) | ffmpeg median error |"
        sep += "---|---|"
    lines = [head, sep]
    for key in keys:
        o = ours[key]
        row = (
            f"| {key} | {o.tp + o.fn} | {o.f1:.3f} ({o.tp}/{o.fp}/{o.fn}) "
            f"| {o.median_error_ms:.1f} ms |"
        )
        if best is not None:
            f = ff[key]
            row += f" {f.f1:.3f} ({f.tp}/{f.fp}/{f.fn}) | {f.median_error_ms:.1f} ms |"
        lines.append(row)
    lines.append("")
    kinds = result["soundedge_recall_per_kind"]
    assert isinstance(kinds, dict)
    lines.append(
        "soundedge recall per kind: " + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items())
    )
    if "ffmpeg_recall_per_kind" in result:
        ff_kinds = result["ffmpeg_recall_per_kind"]
        assert isinstance(ff_kinds, dict)
        lines.append(
            "ffmpeg recall per kind: " + ", ".join(f"{k} {v:.3f}" for k, v in ff_kinds.items())
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
