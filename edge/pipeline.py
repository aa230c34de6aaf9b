"""The pipeline: ring → detector → event files, on the event loop.

Woken by the capture callback (through `call_soon_threadsafe`) once per batch of
`audio.process_interval_s` of audio, or at once when a block looks like the start of a sound
(`on_audio_block`, `OnsetGate`), it reads the new frames from the ring, checks the input for a
dead microphone, runs the detector and feeds open recordings. File
writes go to one dedicated thread in submission order, so the loop never waits on the disk and
the audio stream is never stopped to write a file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from edge.bus import EventBus, EventFinished, EventStarted
from edge.capture import AudioSource
from edge.detector import DetectionEvent, Detector
from edge.errors import SoundedgeError, StorageError
from edge.messages.common import EventRecord
from edge.onsetgate import OnsetGate
from edge.recorder import EventMeta, EventWriter, new_event_id
from edge.ring import AudioBlock, AudioRing, FramesLostError
from edge.runtime import RuntimeConfig
from edge.settings import AgentSettings
from edge.state import AgentState, DeadInputReason
from edge.store import EventStore
from edge.timeutil import from_timestamp

logger = logging.getLogger(__name__)

# Read at most this much of a backlog per step, so one step never holds the loop for long.
MAX_STEP_S = 1.0
# A wall-clock step larger than this between blocks, unexplained by the audio, is a clock jump.
CLOCK_JUMP_S = 1.0
CLIP_LEVEL = 0.999
# After the audio thread saw a likely onset, process every block (no batching) for this much
# audio plus the detector's min_event_s: what it needs to confirm an event.
EAGER_AFTER_ONSET_S = 0.1


@dataclass
class _Recording:
    """One event file being recorded."""

    writer: EventWriter
    next_frame: int
    onset_frame: int
    end_frame: int | None = None  # offset + post-roll, once the detector ended the event
    offset_frame: int | None = None
    peak_dbfs: float = float("-inf")
    noise_floor_dbfs: float = float("-inf")
    split: bool = False
    clock_uncertain: bool = False


@dataclass
class _DeadInputTracker:
    reason: DeadInputReason | None = None
    frames: int = 0

    def update(self, block: AudioBlock) -> DeadInputReason | None:
        """The dead-input kind of this block, or None if it carries real sound."""
        if block.size == 0:
            return self.reason
        # Two reductions instead of an |x| copy per block: this runs for every block.
        high = float(block.max())
        low = float(block.min())
        peak = max(high, -low)
        reason: DeadInputReason | None
        if peak == 0.0:
            reason = "silent"
        elif high == low:
            reason = "constant"
        elif (
            peak >= CLIP_LEVEL and np.count_nonzero(np.abs(block) >= CLIP_LEVEL) > 0.5 * block.size
        ):
            reason = "clipped"
        else:
            reason = None
        if reason == self.reason:
            self.frames += block.shape[0]
        else:
            self.reason, self.frames = reason, block.shape[0]
        return reason


@dataclass
class _WallClock:
    """Maps absolute frame indices to UTC wall time through the source's latest anchor."""

    samplerate: int
    anchor_frame: int = 0
    anchor_time: float = field(default_factory=time.time)

    def update(self, anchor: tuple[int, float], same_source: bool) -> bool:
        """Take a new anchor; True if the wall clock jumped (NTP step, manual change)."""
        frame, wall = anchor
        if wall == 0.0:
            return False
        predicted = self.anchor_time + (frame - self.anchor_frame) / self.samplerate
        jumped = same_source and abs(wall - predicted) > CLOCK_JUMP_S
        self.anchor_frame, self.anchor_time = frame, wall
        return jumped

    def time_of(self, frame: int) -> datetime:
        return from_timestamp(self.anchor_time + (frame - self.anchor_frame) / self.samplerate)


class Pipeline:
    """Detection and recording for one agent. Runs on the event loop."""

    def __init__(
        self,
        runtime: RuntimeConfig,
        ring: AudioRing,
        store: EventStore,
        bus: EventBus,
        state: AgentState,
        source: AudioSource,
        source_generation: Callable[[], int],
    ) -> None:
        settings = runtime.settings
        self._runtime = runtime
        self._ring = ring
        self._store = store
        self._bus = bus
        self._state = state
        self._source = source
        self._source_generation = source_generation
        self._samplerate = settings.audio.samplerate
        self._channels = settings.audio.channels
        self._detector = Detector(settings.detector, self._samplerate, self._channels)
        self._clock = _WallClock(self._samplerate)
        self._dead = _DeadInputTracker()
        self._recordings: list[_Recording] = []
        self._finishing: set[asyncio.Future[EventRecord | None]] = set()
        self._position = ring.frames_written
        self._generation = -1
        self._wake = asyncio.Event()
        # Batching, shared with the audio thread through plain ints (atomic in CPython): the
        # loop wants to be woken once the ring reaches `_wake_at_frame`, and for every block
        # until `_eager_until_frame` (after a likely onset) unless the loop has marked that
        # window done (`_eager_done`: the detector started the event, nothing left to hurry).
        self._onset_gate = OnsetGate()
        self._wake_at_frame = 0
        self._eager_until_frame = 0
        self._eager_done = 0
        self._batch_frames = 0
        self._eager_frames = 0
        self._set_batching(settings)
        # One thread writes every file, in submission order; the loop never waits on the disk.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-writer")
        runtime.add_listener(self._on_settings_changed)

    # -- wiring -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Called on the loop (via call_soon_threadsafe from the audio thread)."""
        self._wake.set()

    def on_audio_block(self, block: AudioBlock | None) -> bool:
        """Audio thread, after each block reached the ring (None: the stream ended).

        True if the loop should run the pipeline now: the batch is full, or the block looks
        like the start of a sound (then every block for a while, so the detector can confirm
        the event and `start` goes out without waiting for a batch), or the stream ended.
        """
        written = self._ring.frames_written
        if block is None:
            return True
        if self._onset_gate.update(block):
            self._eager_until_frame = written + self._eager_frames
            return True
        eager_until = self._eager_until_frame
        return written >= self._wake_at_frame or (
            written < eager_until and eager_until != self._eager_done
        )

    def _set_batching(self, settings: AgentSettings) -> None:
        rate = self._samplerate
        self._batch_frames = round(settings.audio.process_interval_s * rate)
        self._eager_frames = round((settings.detector.min_event_s + EAGER_AFTER_ONSET_S) * rate)

    @property
    def detector(self) -> Detector:
        return self._detector

    def _on_settings_changed(self, settings: AgentSettings) -> None:
        self._detector.update_settings(settings.detector)
        self._set_batching(settings)

    # -- main loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        # The stop event also wakes the loop, so waiting needs no timeout (a wait_for per
        # audio block would cost a task and a timer each time).
        stop_waiter = asyncio.create_task(stop.wait(), name="pipeline-stop")
        stop_waiter.add_done_callback(lambda _: self._wake.set())
        try:
            while not stop.is_set():
                await self._wake.wait()
                self._wake.clear()
                await self._drain()
                # Batch blocks: fewer wake-ups and detector calls. Counted in frames, so an
                # unpaced source (a file) batches as much audio as a sound card does.
                self._wake_at_frame = self._position + max(1, self._batch_frames)
                if self._ring.frames_written >= self._wake_at_frame:
                    self._wake.set()  # the batch filled up while this one was processed
            await self._drain()
            await self._close_all()
        finally:
            stop_waiter.cancel()
            self._writer.shutdown(wait=True)

    async def _drain(self) -> None:
        max_step = int(MAX_STEP_S * self._samplerate)
        while self._position < self._ring.frames_written:
            stop = min(self._ring.frames_written, self._position + max_step)
            try:
                block = self._ring.read(self._position, stop)
            except FramesLostError as lost:
                missing = lost.first_available - self._position
                self._state.frames_lost += missing
                logger.error("pipeline fell behind: %d frames were overwritten", missing)
                self._position = lost.first_available
                continue
            await self._process(block, self._position)
            self._position += block.shape[0]
            await asyncio.sleep(0)  # let MQTT and websocket tasks run between big steps

    async def _process(self, block: AudioBlock, block_start: int) -> None:
        state = self._state
        generation = self._source_generation()
        state.overflows = self._source.overflows
        # An unpaced source (a file, ALSA's file plugin) outruns the wall clock by design.
        same_source = generation == self._generation and self._source.paced
        if self._clock.update(self._source.clock_anchor, same_source=same_source):
            state.clock_jumps += 1
            logger.warning("the wall clock jumped; open events are marked clock_uncertain")
            for recording in self._recordings:
                recording.clock_uncertain = True
        self._generation = generation
        self._check_dead_input(block)

        settings = self._runtime.settings
        if settings.enabled:
            events = self._detector.process(block)
        elif self._detector.status.active:
            events = self._detector.flush()
        else:
            events = []
        status = self._detector.status
        state.level_dbfs = status.level_dbfs
        state.peak_dbfs = max(state.peak_dbfs, status.peak_dbfs)
        state.noise_floor_dbfs = status.noise_floor_dbfs
        state.event_active = status.active
        state.frames_processed += block.shape[0]
        state.last_block_monotonic = time.monotonic()

        if any(event.kind == "start" for event in events):
            # The start is out: the rest of the eager window would only cost wake-ups. A new
            # onset gets a new window (another frame number), which this does not end.
            self._eager_done = self._eager_until_frame
        for event in events:
            await self._handle(event, settings)
        self._feed(block, block_start, block_start + block.shape[0])

    def _check_dead_input(self, block: AudioBlock) -> None:
        reason = self._dead.update(block)
        limit = int(self._runtime.settings.audio.dead_input_s * self._samplerate)
        state = self._state
        if reason is not None and self._dead.frames >= limit and state.dead_input != reason:
            state.dead_input = reason
            logger.warning(
                "input from %s is %s for %.0f s: check the microphone and cable",
                state.device_name, reason, self._dead.frames / self._samplerate,
            )  # fmt: skip
        elif reason is None and state.dead_input is not None:
            logger.info("input from %s carries sound again", state.device_name)
            state.dead_input = None

    async def _handle(self, event: DetectionEvent, settings: AgentSettings) -> None:
        if event.kind == "start":
            await self._open(event, settings)
            return
        open_recordings = [r for r in self._recordings if r.end_frame is None]
        if not open_recordings:
            logger.error("detector ended an event that was never started (sample %d)", event.sample)
            return
        recording = open_recordings[0]
        post_roll = int(settings.recording.post_roll_s * self._samplerate)
        recording.offset_frame = event.sample
        recording.end_frame = event.sample + post_roll
        recording.peak_dbfs = event.peak_dbfs
        recording.noise_floor_dbfs = event.noise_floor_dbfs
        recording.split = event.split

    async def _open(self, event: DetectionEvent, settings: AgentSettings) -> None:
        pre_roll = int(settings.recording.pre_roll_s * self._samplerate)
        first = max(event.sample - pre_roll, self._ring.first_available)
        try:
            seq = await asyncio.to_thread(self._store.reserve_seq)
        except (OSError, StorageError) as exc:
            logger.error("cannot reserve a sequence number, event not recorded: %s", exc)
            return
        onset_time = self._clock.time_of(event.sample)
        meta = EventMeta(
            event_id=new_event_id(),
            seq=seq,
            device_id=settings.device_id,
            onset_time=onset_time,
            # Spans inside one file come from sample counts, not the wall clock.
            file_start_time=onset_time
            - timedelta(seconds=(event.sample - first) / self._samplerate),
            samplerate=self._samplerate,
            channels=self._channels,
            recording=settings.recording,
            detector=settings.detector,
        )
        writer = EventWriter(meta, self._store.directory_for(onset_time))
        recording = _Recording(writer=writer, next_frame=first, onset_frame=event.sample)
        self._recordings.append(recording)
        self._writer.submit(self._open_file, writer)
        self._bus.publish(
            EventStarted(
                event_id=meta.event_id,
                seq=seq,
                onset_time=onset_time,
                level_dbfs=event.peak_dbfs,
                noise_floor_dbfs=event.noise_floor_dbfs,
            )
        )
        logger.info("event %d started (%.1f dBFS)", seq, event.peak_dbfs)

    def _open_file(self, writer: EventWriter) -> None:
        # Writer thread. Make room first, so a full disk costs old collected files, not this one.
        expected = int(self._runtime.settings.detector.max_event_s * self._samplerate * 2)
        self._store.enforce_retention(reserve_bytes=expected * self._channels)
        try:
            writer.open()
        except StorageError as exc:  # its future is not awaited: say it here
            logger.error("event %d: %s", writer.meta.seq, exc)

    def _feed(self, block: AudioBlock, block_start: int, block_end: int) -> None:
        """Give every open recording its frames up to the end of this block."""
        for recording in list(self._recordings):
            stop = block_end if recording.end_frame is None else min(block_end, recording.end_frame)
            if stop > recording.next_frame:
                if recording.next_frame >= block_start:
                    data = block[recording.next_frame - block_start : stop - block_start]
                else:  # pre-roll still in the ring, before this block
                    data = self._read_ring(recording.next_frame, stop)
                self._writer.submit(recording.writer.write, data)
                recording.next_frame = stop
            if recording.end_frame is not None and recording.next_frame >= recording.end_frame:
                self._finish(recording)

    def _read_ring(self, start: int, stop: int) -> AudioBlock:
        try:
            return self._ring.read(start, stop)
        except FramesLostError as lost:
            return self._ring.read(lost.first_available, stop)

    def _finish(self, recording: _Recording) -> None:
        self._recordings.remove(recording)
        offset = (
            recording.offset_frame if recording.offset_frame is not None else recording.next_frame
        )
        offset_time = recording.writer.meta.onset_time + timedelta(
            seconds=(offset - recording.onset_frame) / self._samplerate
        )
        future = asyncio.wrap_future(self._writer.submit(self._finish_file, recording, offset_time))
        self._finishing.add(future)
        future.add_done_callback(self._on_finished)

    def _finish_file(self, recording: _Recording, offset_time: datetime) -> EventRecord | None:
        # Writer thread: close, checksum, log, rename, then keep within the disk limits.
        try:
            record = recording.writer.finish(
                offset_time=offset_time,
                peak_dbfs=recording.peak_dbfs,
                noise_floor_dbfs=recording.noise_floor_dbfs,
                split=recording.split,
                clock_uncertain=recording.clock_uncertain,
            )
            self._store.add(record, recording.writer.part_path)
            self._store.enforce_retention()
        except SoundedgeError as exc:
            logger.error("event %d could not be saved: %s", recording.writer.meta.seq, exc)
            return None
        return record

    def _on_finished(self, future: asyncio.Future[EventRecord | None]) -> None:
        self._finishing.discard(future)
        if future.cancelled():
            return
        if (error := future.exception()) is not None:
            logger.error("writing an event file failed: %s", error, exc_info=error)
            return
        record = future.result()
        if record is None:
            return
        self._state.events_recorded += 1
        self._state.last_event_seq = record.seq
        self._bus.publish(EventFinished(record))
        logger.info(
            "event %d saved: %s (%.2f s)",
            record.seq, record.file.name if record.file else "-", record.duration_s,
        )  # fmt: skip

    async def _close_all(self) -> None:
        """Shutdown: end open events at the current position and finish every file."""
        for event in self._detector.flush():
            await self._handle(event, self._runtime.settings)
        for recording in list(self._recordings):
            if recording.end_frame is None:
                recording.offset_frame = self._position
            recording.end_frame = self._position
            self._finish(recording)
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
