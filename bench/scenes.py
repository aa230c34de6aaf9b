"""Scene generator for the detection benchmarks: mono 48 kHz scenes with known events.

Each scene is ~60 s of one background (white, pink or brown noise, mains hum with harmonics, or
pink noise whose level drifts by ±6 dB) with events of several kinds mixed in at one SNR (event
RMS over its own span against the background RMS over the same span):

- chirp: a tonal sweep with two harmonics (a bird call, an alarm);
- speech: a word or phrase spoken by espeak-ng;
- knock: a CC0 percussion recording from Debian's sonic-pi-samples (synthetic knock if the
  package is missing);
- burst: band-limited noise with a fast attack (a door, a clap, a splash);
- rumble: low-pass noise with slow edges (a truck, thunder).

Everything is driven by the seeds in `bench/scenes_seeds.json`, so the same scenes (and figures)
come back on every machine with the same package versions. Run `python3 -m bench.scenes` to
write the scenes and their truth to `bench/out/scenes/`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
from scipy import signal

SR = 48000
SCENE_S = 60.0
BACKGROUND_RMS_DBFS = -45.0
SEEDS_FILE = Path(__file__).with_name("scenes_seeds.json")
OUT_DIR = Path(__file__).parent / "out" / "scenes"
SAMPLES_DIR = Path("/usr/share/sonic-pi/samples")
# Percussive CC0 recordings used as knocks (if sonic-pi-samples is installed).
KNOCK_SAMPLES = (
    "drum_tom_lo_soft",
    "drum_tom_mid_soft",
    "drum_snare_soft",
    "perc_snap",
    "elec_wood",
    "drum_bass_soft",
    "elec_tick",
    "perc_bell",
)
PHRASES = (
    "hello",
    "open the door",
    "seven",
    "where are you",
    "stop",
    "the quick brown fox",
    "yes",
    "good morning everyone",
)
KINDS = ("chirp", "speech", "knock", "burst", "rumble")
BACKGROUNDS = ("white", "pink", "brown", "hum", "drift")
SNRS_DB = (0, 6, 12, 20)

Audio = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TruthEvent:
    kind: str
    onset_s: float
    offset_s: float


@dataclass(frozen=True)
class SceneSpec:
    name: str
    background: str
    snr_db: float
    seed: int


def load_specs() -> list[SceneSpec]:
    data = json.loads(SEEDS_FILE.read_text(encoding="utf-8"))
    return [SceneSpec(**item) for item in data["scenes"]]


# ---------------------------------------------------------------- backgrounds
def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> Audio:
    """Noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), above 20 Hz."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SR)
    shape = np.maximum(freqs, 20.0) ** (-exponent / 2.0)
    out = np.fft.irfft(spectrum * shape, n)
    return np.asarray(out / np.sqrt(np.mean(out**2)), dtype=np.float64)


def make_background(kind: str, rng: np.random.Generator, n: int) -> Audio:
    t = np.arange(n) / SR
    if kind == "white":
        bg = rng.standard_normal(n)
    elif kind == "pink":
        bg = _colored_noise(rng, n, 1.0)
    elif kind == "brown":
        bg = _colored_noise(rng, n, 2.0)
    elif kind == "hum":
        mains = float(rng.choice([50.0, 60.0]))
        bg = np.zeros(n)
        for harmonic in range(1, 10):
            amplitude = 1.0 / harmonic**1.5
            bg += amplitude * np.sin(2 * np.pi * mains * harmonic * t + rng.uniform(0, 2 * np.pi))
        bg /= np.sqrt(np.mean(bg**2))
        bg += 0.03 * rng.standard_normal(n)  # the electronics' own hiss, 30 dB below the hum
    elif kind == "drift":
        period_s = rng.uniform(20.0, 50.0)
        gain_db = 6.0 * np.sin(2 * np.pi * t / period_s + rng.uniform(0, 2 * np.pi))
        bg = _colored_noise(rng, n, 1.0) * 10 ** (gain_db / 20.0)
    else:
        raise ValueError(f"unknown background {kind!r}")
    bg = bg / np.sqrt(np.mean(bg**2))
    return np.asarray(bg * 10 ** (BACKGROUND_RMS_DBFS / 20.0), dtype=np.float64)


# --------------------------------------------------------------------- events
def _envelope(n: int, attack_s: float, release_s: float) -> Audio:
    env = np.ones(n)
    a = min(n // 2, max(1, round(attack_s * SR)))
    r = min(n - a, max(1, round(release_s * SR)))
    env[:a] = np.linspace(0.0, 1.0, a)
    env[n - r :] = np.linspace(1.0, 0.0, r)
    return env


def make_chirp(rng: np.random.Generator) -> Audio:
    dur = rng.uniform(0.15, 0.8)
    n = round(dur * SR)
    t = np.arange(n) / SR
    f0, f1 = rng.uniform(600, 2500), rng.uniform(1200, 5000)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * dur))
    tone = np.sin(phase) + 0.3 * np.sin(2 * phase) + 0.1 * np.sin(3 * phase)
    return tone * _envelope(n, 0.005, 0.02)


def make_burst(rng: np.random.Generator) -> Audio:
    dur = rng.uniform(0.08, 0.6)
    n = round(dur * SR)
    low = rng.uniform(200, 1500)
    high = rng.uniform(3000, 12000)
    sos = signal.butter(4, [low, high], btype="bandpass", fs=SR, output="sos")
    noise = signal.sosfilt(sos, rng.standard_normal(n + 2000))[2000:]
    decay = np.exp(-np.arange(n) / SR / rng.uniform(0.05, 0.5))
    return np.asarray(noise * decay * _envelope(n, 0.002, 0.01), dtype=np.float64)


def make_rumble(rng: np.random.Generator) -> Audio:
    dur = rng.uniform(1.0, 3.0)
    n = round(dur * SR)
    sos = signal.butter(4, [40.0, rng.uniform(200.0, 400.0)], btype="bandpass", fs=SR, output="sos")
    noise = signal.sosfilt(sos, rng.standard_normal(n + 4800))[4800:]
    return np.asarray(noise * _envelope(n, 0.15, 0.3), dtype=np.float64)


def make_synthetic_knock(rng: np.random.Generator) -> Audio:
    n = round(rng.uniform(0.06, 0.15) * SR)
    t = np.arange(n) / SR
    body = np.zeros(n)
    for _ in range(3):
        body += np.sin(2 * np.pi * rng.uniform(150, 2000) * t) * np.exp(
            -t / rng.uniform(0.01, 0.04)
        )
    body += 0.5 * rng.standard_normal(n) * np.exp(-t / 0.003)
    return body


def _trim(audio: Audio, floor_db: float = -40.0) -> Audio:
    """Cut leading and trailing parts below floor_db re the peak (the recording's own silence)."""
    env = np.abs(audio)
    above = np.flatnonzero(env > env.max() * 10 ** (floor_db / 20.0))
    return audio[above[0] : above[-1] + 1] if above.size else audio


class Library:
    """Recorded sounds: knocks from sonic-pi-samples, speech from espeak-ng (cached)."""

    def __init__(self, cache_dir: Path) -> None:
        self.knocks: list[Audio] = []
        for name in KNOCK_SAMPLES:
            path = SAMPLES_DIR / f"{name}.flac"
            if path.exists():
                self.knocks.append(_trim(self._load(path)))
        self.speech: list[Audio] = []
        if shutil.which("espeak-ng"):
            cache_dir.mkdir(parents=True, exist_ok=True)
            for i, phrase in enumerate(PHRASES):
                path = cache_dir / f"speech_{i}.wav"
                if not path.exists():
                    subprocess.run(
                        ["espeak-ng", "-v", "en", "-s", "150", "-w", str(path), phrase],
                        check=True,
                        capture_output=True,
                    )
                self.speech.append(_trim(self._load(path)))

    @staticmethod
    def _load(path: Path) -> Audio:
        audio, rate = sf.read(str(path), dtype="float64", always_2d=True)
        mono = audio.mean(axis=1)
        if rate != SR:
            g = np.gcd(int(rate), SR)
            mono = signal.resample_poly(mono, SR // g, int(rate) // g)
        return np.asarray(mono, dtype=np.float64)

    def make(self, kind: str, rng: np.random.Generator) -> Audio:
        if kind == "chirp":
            return make_chirp(rng)
        if kind == "burst":
            return make_burst(rng)
        if kind == "rumble":
            return make_rumble(rng)
        if kind == "knock":
            if self.knocks:
                return self.knocks[int(rng.integers(len(self.knocks)))].copy()
            return make_synthetic_knock(rng)
        if kind == "speech":
            if self.speech:
                return self.speech[int(rng.integers(len(self.speech)))].copy()
            return make_chirp(rng)
        raise ValueError(f"unknown event kind {kind!r}")


# ---------------------------------------------------------------------- scene
def make_scene(spec: SceneSpec, library: Library) -> tuple[Audio, list[TruthEvent]]:
    rng = np.random.default_rng(spec.seed)
    n = round(SCENE_S * SR)
    background = make_background(spec.background, rng, n)
    mix = background.copy()
    truth: list[TruthEvent] = []
    # Events start after a 2 s warm-up and are at least 1.5 s apart (longer than any hang).
    position = 2.0 + rng.uniform(0.0, 1.0)
    kinds = list(KINDS) * 4
    rng.shuffle(kinds)
    for kind in kinds:
        event = library.make(kind, rng)
        length_s = event.size / SR
        if position + length_s > SCENE_S - 1.0:
            break
        start = round(position * SR)
        span = slice(start, start + event.size)
        bg_rms = np.sqrt(np.mean(background[span] ** 2))
        ev_rms = np.sqrt(np.mean(event**2))
        mix[span] += event * (bg_rms / ev_rms) * 10 ** (spec.snr_db / 20.0)
        truth.append(TruthEvent(kind, start / SR, (start + event.size) / SR))
        position += length_s + rng.uniform(1.5, 3.0)
    return mix, truth


def write_scenes(out_dir: Path = OUT_DIR) -> list[tuple[SceneSpec, Path, list[TruthEvent]]]:
    """Write every scene as 16-bit WAV plus a truth JSON; reuse files already written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    library = Library(out_dir / "library")
    result = []
    for spec in load_specs():
        wav = out_dir / f"{spec.name}.wav"
        truth_path = out_dir / f"{spec.name}.json"
        if wav.exists() and truth_path.exists():
            truth = [TruthEvent(**e) for e in json.loads(truth_path.read_text())["events"]]
        else:
            audio, truth = make_scene(spec, library)
            peak = np.max(np.abs(audio))
            if peak >= 1.0:
                raise RuntimeError(f"{spec.name} clips (peak {peak:.2f})")
            with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".wav", delete=False) as tmp:
                sf.write(tmp.name, audio, SR, subtype="PCM_16")
            Path(tmp.name).replace(wav)
            truth_path.write_text(
                json.dumps({"spec": asdict(spec), "events": [asdict(e) for e in truth]}, indent=1)
            )
        result.append((spec, wav, truth))
    return result


def main() -> None:
    scenes = write_scenes()
    n_events = sum(len(t) for _, _, t in scenes)
    print(f"{len(scenes)} scenes, {n_events} events in {OUT_DIR}")


if __name__ == "__main__":
    main()
