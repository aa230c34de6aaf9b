"""The audio thread's onset check (pure logic on synthetic blocks)."""

import numpy as np

from edge.onsetgate import OnsetGate

BLOCK = 1024


def _noise(rng: np.random.Generator, level_dbfs: float, channels: int = 1) -> np.ndarray:
    scale = 10 ** (level_dbfs / 20)
    return (rng.standard_normal((BLOCK, channels)) * scale).astype(np.float32)


def _tone(amplitude: float, channels: int = 1) -> np.ndarray:
    t = np.arange(BLOCK) / 48000
    wave = (amplitude * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def test_steady_noise_never_fires() -> None:
    rng = np.random.default_rng(1)
    gate = OnsetGate()
    assert not any(gate.update(_noise(rng, -50)) for _ in range(2000))


def test_a_sound_over_noise_fires_once_and_again_after_it_ended() -> None:
    rng = np.random.default_rng(2)
    gate = OnsetGate()
    for _ in range(50):
        gate.update(_noise(rng, -50))
    fired = [gate.update(_noise(rng, -50) + _tone(0.1)) for _ in range(20)]
    assert fired[0]
    assert not any(fired[1:])  # one wake-up per sound, not one per block
    for _ in range(5):
        assert not gate.update(_noise(rng, -50))
    assert gate.update(_noise(rng, -50) + _tone(0.1))


def test_a_slow_rise_is_followed_without_firing() -> None:
    rng = np.random.default_rng(3)
    gate = OnsetGate()
    # +0.05 dB per block: 20 dB over 400 blocks (~9 s), like traffic approaching.
    fired = [gate.update(_noise(rng, -60 + 0.05 * i)) for i in range(400)]
    assert not any(fired)


def test_fires_on_stereo_blocks_and_after_digital_silence() -> None:
    gate = OnsetGate()
    silence = np.zeros((BLOCK, 2), dtype=np.float32)
    assert not gate.update(silence)
    assert not gate.update(silence)
    assert gate.update(_tone(0.01, channels=2))
