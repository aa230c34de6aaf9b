"""Audio capture: the PortAudio input stream (and a file source with the same interface).

The PortAudio callback runs on a real-time thread. It only copies the block into the ring,
counts overflow flags, notes the time, and calls the wake-up function with the block (in the
agent: an onset check and `loop.call_soon_threadsafe`). Everything else runs elsewhere. The
stream is sounddevice's raw one: it hands over PortAudio's buffer as it is, which the ring
copies as bytes, instead of wrapping every block in a numpy array first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.aio import sleep_unless
from edge.errors import AudioDeviceError
from edge.ring import AudioBlock, AudioRing
from edge.settings import AudioSettings
from edge.state import CaptureState

logger = logging.getLogger(__name__)

# Called on the capture thread after each block with the block just written to the ring, or
# with None when the stream ended (the pipeline should look now).
WakeUp = Callable[[AudioBlock | None], None]


@dataclass(frozen=True, slots=True)
class InputDevice:
    index: int
    name: str
    channels: int
    default_samplerate: float
    is_default: bool
    hostapi: str


class AudioSource(Protocol):
    """Something that fills an `AudioRing` in the background (a sound card, a file)."""

    name: str
    overflows: int
    paced: bool  # delivers in real time (a sound card): faster means the driver is failing

    def open(self, ring: AudioRing, wake: WakeUp) -> None:
        """Start delivering audio into `ring`; raise AudioDeviceError if that is impossible."""

    def close(self) -> None:
        """Stop delivering audio; safe to call twice."""

    @property
    def active(self) -> bool:
        """True while audio is flowing (False once the device failed or the file ended)."""

    @property
    def last_block_monotonic(self) -> float:
        """`time.monotonic()` of the most recent block (0 before the first)."""

    @property
    def clock_anchor(self) -> tuple[int, float]:
        """(absolute frame index at the end of the last block, `time.time()` then)."""


def _sounddevice() -> Any:
    """Import sounddevice lazily: it loads libportaudio, which a controller never needs."""
    try:
        import sounddevice  # noqa: PLC0415
    except OSError as exc:  # libportaudio2 missing
        raise AudioDeviceError(
            f"PortAudio is not available ({exc}); install libportaudio2"
        ) from exc
    _after_first_scan()  # the import initialised PortAudio: its device scan is over
    return sounddevice


@functools.cache
def _after_first_scan() -> None:
    release_alsa_plugins()


def prepare_portaudio() -> None:
    """Initialise PortAudio now (its device scan), leaving an error for the capture to report."""
    with contextlib.suppress(AudioDeviceError):
        _sounddevice()


def release_alsa_plugins() -> None:
    """Unload what PortAudio's ALSA device scan left loaded, once the scan is over.

    To list devices, PortAudio opens every PCM of the ALSA configuration; each plugin it
    meets is loaded with its libraries (the a52 plugin alone brings libavcodec and its long
    dependency chain) and alsa-lib keeps them all, with the parsed configuration, until its
    global configuration is freed: 10+ MiB of resident memory for the life of the agent. No
    stream is open here; opening one later re-reads the configuration and loads only the
    plugins that stream uses. Harmless where there is no ALSA (no libasound, not Linux).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libasound = ctypes.CDLL("libasound.so.2")
        libasound.snd_config_update_free_global()
    except (OSError, AttributeError) as exc:
        logger.debug("cannot free ALSA's configuration: %s", exc)


def list_input_devices() -> list[InputDevice]:
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"cannot list audio devices: {exc}") from exc
    result = []
    for info in devices:
        if info["max_input_channels"] <= 0:
            continue
        result.append(
            InputDevice(
                index=int(info["index"]),
                name=str(info["name"]),
                channels=int(info["max_input_channels"]),
                default_samplerate=float(info["default_samplerate"]),
                is_default=int(info["index"]) == default_in,
                hostapi=str(hostapis[info["hostapi"]]["name"]),
            )
        )
    return result


def resolve_device(spec: str | None, devices: list[InputDevice]) -> InputDevice:
    """Find the input device named by `spec`: an index, or part of a name (case-insensitive)."""
    if not devices:
        raise AudioDeviceError("no audio input device found")
    if spec is None or spec.strip() == "":
        for device in devices:
            if device.is_default:
                return device
        return devices[0]
    available = ", ".join(f"{d.index} '{d.name}'" for d in devices)
    text = spec.strip()
    if text.isdigit():
        for device in devices:
            if device.index == int(text):
                return device
        raise AudioDeviceError(
            f"SOUNDEDGE_AUDIO__DEVICE: no input device with index {text} (inputs: {available})"
        )
    matches = [d for d in devices if text.lower() in d.name.lower()]
    exact = [d for d in matches if d.name.lower() == text.lower()]
    if exact:
        return exact[0]
    if not matches:
        raise AudioDeviceError(
            f"SOUNDEDGE_AUDIO__DEVICE: no input device name contains '{text}' (inputs: {available})"
        )
    if len(matches) > 1:
        logger.info("'%s' matches %d devices; using %s", text, len(matches), matches[0].name)
    return matches[0]


def reinitialise_portaudio() -> None:
    """Re-scan devices: PortAudio only sees a re-plugged USB card after re-initialisation.

    Only safe while no stream is open; the capture supervisor calls it between attempts.
    sounddevice documents `_terminate`/`_initialize` for exactly this purpose.
    """
    sd = _sounddevice()
    try:
        sd._terminate()
        sd._initialize()
    except sd.PortAudioError as exc:
        logger.debug("PortAudio re-initialisation failed: %s", exc)
    release_alsa_plugins()


class SoundCardSource:
    """A PortAudio input stream through `sounddevice`, writing into the ring."""

    def __init__(self, settings: AudioSettings) -> None:
        self._settings = settings
        self.name = settings.device or "default input"
        self.overflows = 0
        self.paced = settings.paced  # false: an unpaced test source, not a runaway driver
        self._stream: Any = None
        self._ring: AudioRing | None = None
        self._wake: WakeUp = lambda _block: None
        self._last_block_monotonic = 0.0
        self._anchor: tuple[int, float] = (0, 0.0)
        self._failed = False

    def open(self, ring: AudioRing, wake: WakeUp) -> None:
        sd = _sounddevice()
        device = resolve_device(self._settings.device, list_input_devices())
        if device.channels < self._settings.channels:
            raise AudioDeviceError(
                f"SOUNDEDGE_AUDIO__CHANNELS: device '{device.name}' has {device.channels} input "
                f"channels, {self._settings.channels} requested"
            )
        self.name = device.name
        self._ring = ring
        self._wake = wake
        self._failed = False
        try:
            sd.check_input_settings(
                device=device.index,
                channels=self._settings.channels,
                samplerate=self._settings.samplerate,
                dtype="float32",
            )
            self._stream = sd.RawInputStream(
                device=device.index,
                channels=self._settings.channels,
                samplerate=self._settings.samplerate,
                blocksize=self._settings.blocksize,
                dtype="float32",
                latency=self._settings.latency,
                callback=self._on_audio,
                finished_callback=self._on_finished,
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            self.close()
            raise AudioDeviceError(
                f"cannot open input device '{device.name}' at {self._settings.samplerate} Hz, "
                f"{self._settings.channels} channel(s): {exc}"
            ) from exc

    def _on_audio(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        # Real-time thread: copy, count, note the time, wake the loop. Nothing else.
        # `indata` is PortAudio's buffer of float32 samples, valid during this call only.
        if status.input_overflow:
            self.overflows += 1
        ring = self._ring
        if ring is None:
            return
        block = ring._on_write_buffer(indata, frames)
        self._anchor = (ring.frames_written, time.time())
        self._last_block_monotonic = time.monotonic()
        self._wake(block)

    def _on_finished(self) -> None:
        self._failed = True
        self._wake(None)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.abort(ignore_errors=True)
            stream.close(ignore_errors=True)
        except Exception as exc:  # a vanished device may fail in any way while closing
            logger.debug("closing the input stream: %s", exc)

    @property
    def active(self) -> bool:
        stream = self._stream
        return stream is not None and not self._failed and bool(stream.active)

    @property
    def last_block_monotonic(self) -> float:
        return self._last_block_monotonic

    @property
    def clock_anchor(self) -> tuple[int, float]:
        return self._anchor


class _Pacer:
    """How long to wait so that delivered frames keep pace with real time (or not at all)."""

    def __init__(self, samplerate: int, realtime: bool) -> None:
        self._samplerate = samplerate
        self._realtime = realtime
        self._started = time.monotonic()
        self._frames = 0

    def advance(self, frames: int) -> float:
        self._frames += frames
        if not self._realtime:
            return 0.0
        return max(0.0, self._frames / self._samplerate - (time.monotonic() - self._started))


class FileSource:
    """Plays an audio file into the ring from a thread, paced in real time or as fast as possible.

    For tests, benchmarks and demos without a sound card; the pipeline cannot tell the difference.
    """

    def __init__(
        self, path: Path, blocksize: int = 1024, realtime: bool = True, loop: bool = False
    ) -> None:
        self.path = path
        self.name = f"file:{path.name}"
        self.overflows = 0
        self.paced = realtime
        self._blocksize = blocksize
        self._realtime = realtime
        self._loop = loop
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_block_monotonic = 0.0
        self._anchor: tuple[int, float] = (0, 0.0)
        self.samplerate = 0
        self.finished = threading.Event()

    def open(self, ring: AudioRing, wake: WakeUp) -> None:
        import soundfile as sf  # noqa: PLC0415

        try:
            info = sf.info(str(self.path))
        except (RuntimeError, sf.LibsndfileError) as exc:
            raise AudioDeviceError(f"cannot read {self.path}: {exc}") from exc
        self.samplerate = int(info.samplerate)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._on_thread, args=(ring, wake), name="file-source", daemon=True
        )
        self._thread.start()

    def _on_thread(self, ring: AudioRing, wake: WakeUp) -> None:
        import soundfile as sf  # noqa: PLC0415

        clock = _Pacer(self.samplerate, self._realtime)
        while not self._stop.is_set():
            for block in sf.blocks(
                str(self.path), blocksize=self._blocksize, dtype="float32", always_2d=True
            ):
                if self._stop.is_set():
                    break
                data = np.ascontiguousarray(block[:, : ring.channels], dtype=np.float32)
                if data.shape[1] < ring.channels:
                    data = np.repeat(data[:, :1], ring.channels, axis=1)
                self._deliver(ring, data, wake, clock)
            if not self._loop:
                break
        self.finished.set()
        # After the file: silence in real time, like a microphone in a quiet room, so the
        # pipeline's post-roll completes and the supervisor sees a live source.
        silence = np.zeros((self._blocksize, ring.channels), dtype=np.float32)
        clock = _Pacer(self.samplerate, realtime=True)
        while not self._stop.is_set():
            self._deliver(ring, silence, wake, clock)

    def _deliver(self, ring: AudioRing, data: AudioBlock, wake: WakeUp, pacer: _Pacer) -> None:
        ring.write(data)
        self._anchor = (ring.frames_written, time.time())
        self._last_block_monotonic = time.monotonic()
        wake(data)
        self._stop.wait(pacer.advance(data.shape[0]))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def last_block_monotonic(self) -> float:
        return self._last_block_monotonic

    @property
    def clock_anchor(self) -> tuple[int, float]:
        return self._anchor


class CaptureSupervisor:
    """Keeps an `AudioSource` open: retries with backoff, reopens a vanished or stalled device.

    The agent never exits because of the sound card: a missing device is waited for, a device
    that fails mid-run is closed, PortAudio re-initialised, and the device reopened.
    """

    def __init__(
        self,
        settings: AudioSettings,
        source: AudioSource,
        ring: AudioRing,
        wake: WakeUp,
        on_state: Callable[[CaptureState, str | None], None],
        reinitialise: Callable[[], None] = reinitialise_portaudio,
        on_wedged: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self.source = source
        self._ring = ring
        self._wake = wake
        self._on_state = on_state
        self._reinitialise = reinitialise
        self._on_wedged = on_wedged
        self.wedged = False  # the driver hung; the process must restart to use audio again
        self.generation = 0  # increases with every successful open (the clock anchor resets)
        self.restarts = 0

    async def run(self, stop: asyncio.Event) -> None:
        delay_s = 0.5
        reported: str | None = None
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.source.open, self._ring, self._wake)
            except AudioDeviceError as exc:
                message = str(exc)
                if message != reported:  # say it once, not every retry
                    logger.error(
                        "%s; retrying every %.0f s at most",
                        message,
                        self._settings.reopen_backoff_max_s,
                    )
                    reported = message
                self._on_state("waiting_for_device", message)
                await sleep_unless(stop, delay_s * random.uniform(0.8, 1.2))
                delay_s = min(delay_s * 2, self._settings.reopen_backoff_max_s)
                await asyncio.to_thread(self._reinitialise)
                continue
            self.generation += 1
            again = reported is not None or self.generation > 1
            reported = None
            delay_s = 0.5
            self._on_state("running", None)
            opened_at = time.monotonic()
            flowing = False
            pacing = _RateMeter(self._settings.samplerate, self._ring.frames_written)
            while not stop.is_set():
                await sleep_unless(stop, SUPERVISE_S)
                last = max(self.source.last_block_monotonic, opened_at)
                if not flowing and self.source.last_block_monotonic > opened_at:
                    # Said once audio arrives: opening a device is not the same as hearing it.
                    flowing = True
                    logger.info("capturing from %s%s", self.source.name, " again" if again else "")
                rate_factor = pacing.update(self._ring.frames_written)
                if not self.source.active:
                    problem = f"input device {self.source.name} stopped delivering audio"
                elif self.source.paced and rate_factor > RUNAWAY_FACTOR:
                    # A failing driver can call back in a tight loop with junk (seen with the
                    # ALSA pulse plugin when its server dies): treat it as a lost device.
                    problem = (
                        f"input device {self.source.name} delivers audio {rate_factor:.0f}× "
                        "faster than real time"
                    )
                elif time.monotonic() - last > self._settings.stall_timeout_s:
                    problem = (
                        f"no audio from {self.source.name} for "
                        f"{self._settings.stall_timeout_s:.0f} s"
                    )
                else:
                    continue
                logger.error("%s; reopening it", problem)
                self._on_state("waiting_for_device", problem)
                self.restarts += 1
                break
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.to_thread(self.source.close)
            except TimeoutError:
                # A wedged driver thread (seen with ALSA's pulse plugin when its source
                # vanishes): PortAudio cannot be re-initialised under it in this process. Stop
                # cleanly so the service manager restarts the agent with a fresh PortAudio.
                logger.error(
                    "the audio driver did not release %s; stopping so that the service "
                    "manager restarts the agent (exit status %d)",
                    self.source.name,
                    EXIT_AUDIO_WEDGED,
                )
                self.wedged = True
                self._on_state("waiting_for_device", "audio driver wedged; restart needed")
                if self._on_wedged is not None:
                    self._on_wedged()
                break
            if not stop.is_set():
                await asyncio.to_thread(self._reinitialise)
        self._on_state("stopped", None)


RUNAWAY_FACTOR = 4.0
CLOSE_TIMEOUT_S = 10.0
# How often the supervisor checks the stream (stall, runaway, failed): well within the stall
# timeout and the rate meter's one-second window.
SUPERVISE_S = 0.5
# EX_TEMPFAIL: systemd's Restart=always brings the agent back with a fresh PortAudio.
EXIT_AUDIO_WEDGED = 75


class _RateMeter:
    """How fast frames arrive compared with real time, over windows of about a second."""

    def __init__(self, samplerate: int, frames: int) -> None:
        self._samplerate = samplerate
        self._frames = frames
        self._since = time.monotonic()
        self.factor = 0.0

    def update(self, frames: int) -> float:
        elapsed = time.monotonic() - self._since
        if elapsed >= 1.0:
            self.factor = (frames - self._frames) / self._samplerate / elapsed
            self._frames, self._since = frames, time.monotonic()
        return self.factor
