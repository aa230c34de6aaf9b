"""Tests of offline detection over audio files (`soundedge detect FILE`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from edge.detect_file import DetectedEvent, DetectFileError, detect_file
from edge.detector import Detector
from edge.settings import DetectorSettings

SR = 48000


def scene(seconds: float = 6.0) -> npt.NDArray[np.float64]:
    """Noise with a 1 kHz tone burst at 2.0-2.4 s and a 3 kHz one at 4.0-4.2 s."""
    rng = np.random.default_rng(11)
    audio = rng.standard_normal(round(seconds * SR)) * 0.003
    for start_s, length_s, freq in ((2.0, 0.4, 1000.0), (4.0, 0.2, 3000.0)):
        t = np.arange(round(length_s * SR)) / SR
        start = round(start_s * SR)
        audio[start : start + t.size] += 0.05 * np.sin(2 * np.pi * freq * t)
    return audio


@pytest.fixture
def wav16(tmp_path: Path) -> Path:
    path = tmp_path / "scene.wav"
    sf.write(path, scene(), SR, subtype="PCM_16")
    return path


def test_events_of_a_wav_file_have_times_in_seconds(wav16: Path) -> None:
    events = detect_file(wav16, DetectorSettings())
    assert len(events) == 2
    frame_s = 0.01
    assert events[0].onset_s == pytest.approx(2.0, abs=frame_s)
    assert events[1].onset_s == pytest.approx(4.0, abs=frame_s)
    for event in events:
        assert event.duration_s == pytest.approx(event.offset_s - event.onset_s)
        assert event.offset_s > event.onset_s
        assert event.peak_dbfs > event.noise_floor_dbfs + 10.0
        assert not event.split
    # The tone ends at 2.4 s; the offset is the last loud frame, not the end of the hang time.
    assert 2.4 - frame_s <= events[0].offset_s <= 2.5


def test_block_size_does_not_change_results(wav16: Path) -> None:
    reference = detect_file(wav16, DetectorSettings())
    for blocksize in (333, 4096, 10**6):
        assert detect_file(wav16, DetectorSettings(), blocksize=blocksize) == reference


def test_file_gives_the_same_events_as_the_live_detector(wav16: Path) -> None:
    audio, _ = sf.read(wav16, dtype="float32", always_2d=True)
    detector = Detector(DetectorSettings(), SR, 1)
    live = []
    for start in range(0, audio.shape[0], 1024):
        live += detector.process(audio[start : start + 1024])
    live += detector.flush()
    onsets = [e.sample / SR for e in live if e.kind == "start"]
    offsets = [e.sample / SR for e in live if e.kind == "end"]
    from_file = detect_file(wav16, DetectorSettings())
    assert [e.onset_s for e in from_file] == onsets
    assert [e.offset_s for e in from_file] == offsets


def test_flac_stereo_and_float_files_are_read(tmp_path: Path) -> None:
    mono = scene()
    stereo = np.stack([mono, mono * 0.5], axis=1)
    flac = tmp_path / "scene.flac"
    sf.write(flac, stereo, SR, subtype="PCM_24")
    floating = tmp_path / "scene_float.wav"
    sf.write(floating, mono, SR, subtype="FLOAT")
    for path in (flac, floating):
        events = detect_file(path, DetectorSettings())
        assert [round(e.onset_s, 1) for e in events] == [2.0, 4.0]


def test_event_open_at_the_end_of_the_file_is_closed(tmp_path: Path) -> None:
    audio = scene()[: 4 * SR]  # the first burst only
    t = np.arange(round(0.5 * SR)) / SR
    audio[-t.size :] += 0.05 * np.sin(2 * np.pi * 1500 * t)
    path = tmp_path / "tail.wav"
    sf.write(path, audio, SR, subtype="PCM_16")
    events = detect_file(path, DetectorSettings())
    assert len(events) == 2
    assert events[-1].onset_s == pytest.approx(3.5, abs=0.01)
    assert events[-1].offset_s == pytest.approx(4.0, abs=0.01)


def test_to_json_dict_is_one_json_object(wav16: Path) -> None:
    event = detect_file(wav16, DetectorSettings())[0]
    data = json.loads(json.dumps(event.to_json_dict()))
    assert set(data) == {
        "onset_s",
        "offset_s",
        "duration_s",
        "peak_dbfs",
        "noise_floor_dbfs",
        "split",
    }
    assert data["onset_s"] == pytest.approx(event.onset_s, abs=1e-4)
    assert isinstance(event, DetectedEvent)


def test_unreadable_file_gives_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "not_audio.wav"
    bogus.write_text("hello")
    with pytest.raises(DetectFileError, match=r"not_audio\.wav"):
        detect_file(bogus, DetectorSettings())
    with pytest.raises(DetectFileError, match=r"missing\.wav"):
        detect_file(tmp_path / "missing.wav", DetectorSettings())
