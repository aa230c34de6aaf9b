"""The ring of buffers: fixed memory, ordered reads, overwrite detection."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.ring import AudioRing, FramesLostError


def _ramp(start: int, count: int, channels: int = 1) -> np.ndarray:
    values = np.arange(start, start + count, dtype=np.float32)
    return np.repeat(values[:, None], channels, axis=1)


def test_capacity_from_buffers_is_count_times_length() -> None:
    ring = AudioRing.from_buffers(buffers=5, buffer_s=0.5, samplerate=48000, channels=2)
    assert ring.capacity_frames == 5 * 24000
    assert ring.channels == 2


def test_read_returns_frames_in_order_across_the_wrap() -> None:
    ring = AudioRing(100, 1)
    ring.write(_ramp(0, 70))
    ring.write(_ramp(70, 70))  # wraps: frames 40..139 are held
    assert ring.first_available == 40
    out = ring.read(40, 140)
    np.testing.assert_array_equal(out[:, 0], np.arange(40, 140, dtype=np.float32))


def test_reading_overwritten_frames_raises_with_first_available() -> None:
    ring = AudioRing(100, 1)
    ring.write(_ramp(0, 250))
    with pytest.raises(FramesLostError) as caught:
        ring.read(100, 200)
    assert caught.value.first_available == 150


def test_block_larger_than_ring_keeps_the_newest_frames() -> None:
    ring = AudioRing(10, 1)
    ring.write(_ramp(0, 25))
    assert ring.frames_written == 25
    np.testing.assert_array_equal(ring.read(15, 25)[:, 0], np.arange(15, 25, dtype=np.float32))


def test_read_beyond_written_is_clamped() -> None:
    ring = AudioRing(10, 1)
    ring.write(_ramp(0, 5))
    assert ring.read(3, 50).shape == (2, 1)
    assert ring.read(5, 9).shape == (0, 1)


@given(
    capacity=st.integers(1, 64),
    blocks=st.lists(st.integers(1, 80), min_size=1, max_size=20),
)
def test_any_block_sequence_holds_exactly_the_last_capacity_frames(
    capacity: int, blocks: list[int]
) -> None:
    ring = AudioRing(capacity, 2)
    written = 0
    for size in blocks:
        ring.write(_ramp(written, size, channels=2))
        written += size
    start = max(0, written - capacity)
    out = ring.read(start, written)
    np.testing.assert_array_equal(out[:, 1], np.arange(start, written, dtype=np.float32))


@given(
    capacity=st.integers(1, 64),
    channels=st.integers(1, 2),
    blocks=st.lists(st.integers(1, 80), min_size=1, max_size=20),
)
def test_raw_buffers_are_held_like_arrays_and_returned_as_written(
    capacity: int, channels: int, blocks: list[int]
) -> None:
    """The audio thread's byte copy of PortAudio's buffer (sounddevice's raw stream) leaves the
    ring exactly as an array write does, and hands back the block it wrote."""
    raw_ring = AudioRing(capacity, channels)
    array_ring = AudioRing(capacity, channels)
    written = 0
    for size in blocks:
        block = _ramp(written, size, channels) - 0.5  # distinct values, not a zero-filled ring
        returned = raw_ring._on_write_buffer(block.tobytes(), size)
        array_ring.write(block)
        np.testing.assert_array_equal(returned, block)
        written += size
    assert raw_ring.frames_written == array_ring.frames_written == written
    np.testing.assert_array_equal(raw_ring._data, array_ring._data)
    start = max(0, written - capacity)
    np.testing.assert_array_equal(raw_ring.read(start, written), array_ring.read(start, written))
