"""The `soundedge` commands. Each takes the parsed arguments and the loaded settings.

Modules only some commands need (the capture module with PortAudio, asyncio, the agent) are
imported inside them: `soundedge detect` starts without them (docs/benchmarks.md, "Detection
cost").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.errors import AudioDeviceError, SettingsError, SoundedgeError, StorageError

if TYPE_CHECKING:
    from edge.ring import AudioRing
    from edge.settings import AgentSettings

# Errors that mean "what you asked for is wrong" (exit 2) rather than "it failed" (exit 1).
USAGE_ERRORS = (SettingsError, AudioDeviceError)
FILE_FORMATS = {".wav": "WAV", ".flac": "FLAC"}


def dispatch(args: argparse.Namespace, settings: AgentSettings) -> int:
    handlers = {
        "devices": cmd_devices,
        "record": cmd_record,
        "level": cmd_level,
        "detect": cmd_detect,
        "run": cmd_run,
        "config": cmd_config,
    }
    return handlers[args.command](args, settings)


def cmd_config(args: argparse.Namespace, settings: AgentSettings) -> int:
    from edge.settings import masked_dump  # noqa: PLC0415

    print(json.dumps(masked_dump(settings), indent=2))
    return 0


def cmd_devices(args: argparse.Namespace, settings: AgentSettings) -> int:
    from edge.capture import list_input_devices  # noqa: PLC0415

    devices = list_input_devices()
    if not devices:
        print("no audio input devices found", file=sys.stderr)
        return 1
    print(f"{'':2}{'index':>5}  {'channels':>8}  {'rate':>7}  {'host API':<12} name")
    for device in devices:
        mark = "*" if device.is_default else " "
        print(
            f"{mark:2}{device.index:>5}  {device.channels:>8}  {device.default_samplerate:>7.0f}  "
            f"{device.hostapi:<12} {device.name}"
        )
    print("\n* default input. Choose one with SOUNDEDGE_AUDIO__DEVICE=<part of the name>.")
    return 0


def _output_format(path: Path) -> str:
    try:
        return FILE_FORMATS[path.suffix.lower()]
    except KeyError:
        raise SettingsError(f"--out: {path.name} must end in .wav or .flac") from None


def _write_audio(path: Path, data: np.ndarray[Any, Any], samplerate: int) -> None:
    import soundfile as sf  # noqa: PLC0415

    try:
        sf.write(str(path), data, samplerate, subtype="PCM_16", format=_output_format(path))
    except (OSError, RuntimeError, sf.LibsndfileError) as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc


def cmd_record(args: argparse.Namespace, settings: AgentSettings) -> int:
    import sounddevice as sd  # noqa: PLC0415

    from edge.capture import list_input_devices, resolve_device  # noqa: PLC0415
    from edge.ring import AudioRing  # noqa: PLC0415

    _output_format(args.out)
    audio = settings.audio
    device = resolve_device(audio.device, list_input_devices())
    if args.seconds is not None:
        if args.seconds <= 0:
            raise SettingsError("--seconds must be positive")
        frames = round(args.seconds * audio.samplerate)
        try:
            # A fixed span straight into a numpy array, the simplest way to capture.
            data = sd.rec(
                frames,
                samplerate=audio.samplerate,
                channels=audio.channels,
                device=device.index,
                dtype="float32",
            )
            sd.wait()
        except sd.PortAudioError as exc:
            raise AudioDeviceError(f"recording from '{device.name}' failed: {exc}") from exc
        _write_audio(args.out, data, audio.samplerate)
        print(f"recorded {args.seconds:g} s from {device.name} to {args.out}")
        return 0

    buffers = args.buffers if args.buffers is not None else audio.ring_buffers
    buffer_s = args.buffer_seconds if args.buffer_seconds is not None else audio.buffer_s
    if buffers < 1 or buffer_s <= 0:
        raise SettingsError("--buffers and --buffer-seconds must be positive")
    ring = AudioRing.from_buffers(buffers, buffer_s, audio.samplerate, audio.channels)
    overflows = 0

    def on_audio(indata: np.ndarray[Any, Any], frames: int, time_info: Any, status: Any) -> None:
        nonlocal overflows
        if status.input_overflow:
            overflows += 1
        ring._on_write(indata)

    done = threading.Event()
    _stop_on_signals(done)
    try:
        with sd.InputStream(
            samplerate=audio.samplerate,
            channels=audio.channels,
            device=device.index,
            dtype="float32",
            blocksize=audio.blocksize,
            callback=on_audio,
        ):
            print(
                f"recording a ring of {buffers} × {buffer_s:g} s from {device.name}; "
                "Ctrl-C stops and saves",
                file=sys.stderr,
            )
            _wait_until_done(done, ring, args.stop_after, audio.samplerate)
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"recording from '{device.name}' failed: {exc}") from exc
    data = ring.read(ring.first_available, ring.frames_written)
    _write_audio(args.out, data, audio.samplerate)
    print(
        f"saved the last {data.shape[0] / audio.samplerate:.1f} s to {args.out}"
        f" ({overflows} overflows)"
    )
    return 0


def _wait_until_done(
    done: threading.Event, ring: AudioRing, stop_after_s: float | None, samplerate: int
) -> None:
    """Until Ctrl-C/SIGTERM, or (tests) until `stop_after_s` seconds of audio were captured."""
    if stop_after_s is None:
        done.wait()
        return
    deadline = time.monotonic() + 3 * stop_after_s + 30  # a device that never delivers
    while not done.wait(0.05) and time.monotonic() < deadline:
        if ring.frames_written >= stop_after_s * samplerate:
            return


def _stop_on_signals(done: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)


def cmd_level(args: argparse.Namespace, settings: AgentSettings) -> int:
    import sounddevice as sd  # noqa: PLC0415

    from edge.capture import list_input_devices, resolve_device  # noqa: PLC0415
    from edge.detector import Detector  # noqa: PLC0415
    from edge.ring import AudioRing  # noqa: PLC0415

    audio = settings.audio
    device = resolve_device(audio.device, list_input_devices())
    ring = AudioRing.from_buffers(2, 5.0, audio.samplerate, audio.channels)
    detector = Detector(settings.detector, audio.samplerate, audio.channels)
    done = threading.Event()
    _stop_on_signals(done)
    tty = sys.stdout.isatty()
    position = 0
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        with sd.InputStream(
            samplerate=audio.samplerate,
            channels=audio.channels,
            device=device.index,
            dtype="float32",
            blocksize=audio.blocksize,
            callback=lambda indata, *_: ring._on_write(indata),
        ):
            print(f"level of {device.name} (Ctrl-C stops)", file=sys.stderr)
            while not done.wait(0.2 if tty else 1.0):
                block = ring.read(max(position, ring.first_available), ring.frames_written)
                position = ring.frames_written
                detector.process(block)
                print(_level_line(detector.status, tty), end="\r" if tty else "\n", flush=True)
                detector.reset_peak()
                if deadline is not None and time.monotonic() >= deadline:
                    break
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"reading '{device.name}' failed: {exc}") from exc
    if tty:
        print()
    return 0


def _level_line(status: Any, tty: bool) -> str:
    level = status.level_dbfs
    bar_width = 40
    filled = 0 if not np.isfinite(level) else int(np.clip((level + 90) / 90, 0, 1) * bar_width)
    bar = "#" * filled + "-" * (bar_width - filled) if tty else ""
    return (
        f"level {level:7.1f} dBFS  peak {status.peak_dbfs:7.1f}  "
        f"floor {status.noise_floor_dbfs:7.1f}  {'ACTIVE' if status.active else '      '} {bar}"
    )


def cmd_detect(args: argparse.Namespace, settings: AgentSettings) -> int:
    from edge.detect_file import detect_file, keep_freed_memory  # noqa: PLC0415

    if not args.file.is_file():
        raise SettingsError(f"{args.file}: no such file")
    keep_freed_memory()
    try:
        events = detect_file(args.file, settings.detector)
    except (RuntimeError, OSError) as exc:
        raise StorageError(f"cannot read {args.file}: {exc}") from exc
    if args.format == "jsonl":
        for event in events:
            print(json.dumps(event.to_json_dict()))
        return 0
    print(f"{'#':>4}  {'onset_s':>9}  {'offset_s':>9}  {'duration':>8}  {'peak_dBFS':>9}")
    for number, event in enumerate(events, 1):
        print(
            f"{number:>4}  {event.onset_s:>9.3f}  {event.offset_s:>9.3f}  "
            f"{event.duration_s:>8.3f}  {event.peak_dbfs:>9.1f}"
        )
    print(f"{len(events)} events", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace, settings: AgentSettings) -> int:
    import asyncio  # noqa: PLC0415

    from edge.capture import EXIT_AUDIO_WEDGED, prepare_portaudio  # noqa: PLC0415

    # PortAudio's device scan loads every ALSA plugin for a moment: do it before the agent's
    # own modules are imported, so that this moment is not the process's peak of memory.
    prepare_portaudio()
    from edge.agent import run_agent  # noqa: PLC0415

    try:
        needs_restart = asyncio.run(run_agent(settings))
    except ExceptionGroup as group:
        # A task of the agent failed: show our own error as one line, anything else is a bug.
        matched, _rest = group.split(SoundedgeError)
        if matched is None:
            raise
        raise _first_leaf(matched) from None
    if needs_restart:
        # Files are finished and logged. Skip interpreter exit: PortAudio's exit handler would
        # wait forever on the wedged driver thread.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_AUDIO_WEDGED)
    return 0


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
