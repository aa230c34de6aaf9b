"""Writing one event's audio to a file: hidden `.part` name, metadata, fsync, checksum.

`EventWriter` is blocking and used from the agent's single file-writing thread, so blocks are
written in order and the event loop never waits on the disk. The store renames the file to its
final name after logging the record.

Metadata: libsndfile's text fields (title, date, software, comment; WAV LIST/INFO and FLAC
Vorbis comments) and, for WAV, a GUANO chunk (https://guano-md.org), the bioacoustics
convention, with time, device, sample rate, levels and detector settings.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import guano
import numpy as np
import numpy.typing as npt
import soundfile as sf

from edge import __version__
from edge.errors import StorageError
from edge.fileio import PART_SUFFIX, fsync_dir, sha256_of
from edge.messages.common import EventFile, EventRecord
from edge.ring import AudioBlock
from edge.settings import DetectorSettings, RecordingSettings
from edge.store import event_file_name, is_valid_event_id, part_path
from edge.timeutil import iso_utc

logger = logging.getLogger(__name__)

GUANO_NAMESPACE = "soundedge"
_SF_FORMAT = {"wav": "WAV", "flac": "FLAC"}


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class EventMeta:
    """What is known about an event when its file is opened."""

    event_id: str
    seq: int
    device_id: str
    onset_time: datetime
    file_start_time: datetime
    samplerate: int
    channels: int
    recording: RecordingSettings
    detector: DetectorSettings


class EventWriter:
    """One event file being written. Blocking methods: call them from the writer thread."""

    def __init__(self, meta: EventMeta, directory: Path) -> None:
        self.meta = meta
        extension = meta.recording.format
        self.final_path = directory / event_file_name(
            meta.device_id, meta.onset_time, meta.seq, extension
        )
        self.part_path = part_path(self.final_path)
        self.frames_written = 0
        # The first failure to create or write the file (a full disk): the file ends there, and
        # nothing after it is written (a later block would splice the sound).
        self.error: StorageError | None = None
        self._file: Any = None

    def open(self) -> None:
        """Create the `.part` file. Raises StorageError (also kept in `error`)."""
        try:
            day = self.part_path.parent
            if not day.is_dir():
                day.mkdir(parents=True, exist_ok=True)
                fsync_dir(day.parent)  # the new day's entry must survive a power cut too
            self._file = sf.SoundFile(
                str(self.part_path),
                mode="w",
                samplerate=self.meta.samplerate,
                channels=self.meta.channels,
                subtype=self.meta.recording.subtype,
                format=_SF_FORMAT[self.meta.recording.format],
            )
        except (OSError, RuntimeError, sf.LibsndfileError) as exc:
            self.error = StorageError(f"cannot create {self.part_path}: {exc}")
            raise self.error from exc
        self._file.title = f"soundedge event {self.meta.seq} on {self.meta.device_id}"
        self._file.date = iso_utc(self.meta.onset_time)
        self._file.software = f"soundedge {__version__}"
        self._file.comment = _identity_comment(self.meta.event_id, self.meta.seq)
        # libsndfile writes a WAV header with size 0 until close; flush it now so that a
        # crash mid-event leaves a file salvage can read.
        self._file.flush()

    def write(self, block: AudioBlock) -> None:
        if self.error is not None:
            return  # the file ends at the first failure, said once
        if self._file is None:
            raise StorageError(f"{self.part_path.name} is not open")
        try:
            self._file.write(block)
        except (OSError, RuntimeError, sf.LibsndfileError) as exc:
            self.error = StorageError(f"cannot write {self.part_path}: {exc}")
            logger.error(
                "event %d: %s; its file ends here, the event goes on without it",
                self.meta.seq,
                self.error,
            )
            return
        self.frames_written += block.shape[0]

    def finish(
        self,
        *,
        offset_time: datetime,
        peak_dbfs: float,
        noise_floor_dbfs: float,
        split: bool,
        clock_uncertain: bool,
    ) -> EventRecord:
        """Close, add metadata, fsync and checksum; the record for the store to log.

        If the file could not even be created, the record has no file: the event is still
        told (its `end` says it has none) rather than lost with it.
        """
        meta = self.meta
        event_s = max(0.0, (offset_time - meta.onset_time).total_seconds())
        file: EventFile | None = None
        pre_roll_s = post_roll_s = 0.0
        if self._file is not None:
            file, duration_s = self._close(event_s, peak_dbfs, noise_floor_dbfs)
            pre_roll_s = max(0.0, (meta.onset_time - meta.file_start_time).total_seconds())
            post_roll_s = max(0.0, duration_s - pre_roll_s - event_s)
        elif self.error is None or self.part_path.exists():
            raise StorageError(f"{self.part_path.name} is not open")
        return EventRecord(
            event_id=meta.event_id,
            seq=meta.seq,
            device_id=meta.device_id,
            onset_time=meta.onset_time,
            offset_time=offset_time,
            duration_s=round(event_s, 6),
            file_start_time=meta.file_start_time,
            pre_roll_s=round(pre_roll_s, 6),
            post_roll_s=round(post_roll_s, 6),
            peak_dbfs=round(peak_dbfs, 2),
            noise_floor_dbfs=round(noise_floor_dbfs, 2),
            split=split,
            clock_uncertain=clock_uncertain,
            file=file,
        )

    def _close(
        self, event_s: float, peak_dbfs: float, noise_floor_dbfs: float
    ) -> tuple[EventFile, float]:
        """Close the open file, add its metadata, fsync and checksum it; its description and
        its duration in seconds."""
        try:
            self._file.close()
        except (OSError, RuntimeError, sf.LibsndfileError) as exc:
            raise StorageError(f"cannot close {self.part_path}: {exc}") from exc
        self._file = None
        meta = self.meta
        frames = self.frames_written
        if self.error is not None:
            # Part of the failed block may have been written: the file says how much.
            try:
                frames = sf.info(str(self.part_path)).frames
            except (RuntimeError, sf.LibsndfileError) as exc:
                raise StorageError(f"cannot read back {self.part_path}: {exc}") from exc
        duration_s = frames / meta.samplerate
        if meta.recording.format == "wav":
            guano_md = _guano_metadata(
                meta, self.final_path.name, duration_s, peak_dbfs, noise_floor_dbfs, event_s
            )
            append_guano_chunk(self.part_path, guano_md)
        _fsync_file(self.part_path)
        file = EventFile(
            name=self.final_path.name,
            size_bytes=self.part_path.stat().st_size,
            sha256=sha256_of(self.part_path),
            format=meta.recording.format,
            duration_s=round(duration_s, 6),
            samplerate=meta.samplerate,
            channels=meta.channels,
        )
        return file, duration_s

    def abort(self) -> None:
        """Close without finishing (shutdown in a hurry); the `.part` file is salvaged later."""
        if self._file is not None:
            try:
                self._file.close()
            except (OSError, RuntimeError, sf.LibsndfileError) as exc:
                logger.error("closing %s: %s", self.part_path.name, exc)
            self._file = None


def _guano_metadata(
    meta: EventMeta,
    file_name: str,
    duration_s: float,
    peak_dbfs: float,
    floor_dbfs: float,
    event_s: float,
) -> bytes:
    md = guano.GuanoFile()
    md["Timestamp"] = meta.file_start_time
    md["Samplerate"] = meta.samplerate
    md["Length"] = round(duration_s, 3)
    md["Original Filename"] = file_name
    md["Note"] = f"soundedge event {meta.seq}"
    ns = GUANO_NAMESPACE
    md[ns, "Version"] = __version__
    md[ns, "Device"] = meta.device_id
    md[ns, "Event ID"] = meta.event_id
    md[ns, "Seq"] = meta.seq
    md[ns, "Onset"] = iso_utc(meta.onset_time)
    md[ns, "Pre-roll"] = round((meta.onset_time - meta.file_start_time).total_seconds(), 3)
    md[ns, "Event Length"] = round(event_s, 3)
    md[ns, "Peak dBFS"] = round(peak_dbfs, 2)
    md[ns, "Noise Floor dBFS"] = round(floor_dbfs, 2)
    for name, value in meta.detector.model_dump().items():
        md[ns, f"Detector {name}"] = "" if value is None else value
    return bytes(md.serialize())


def append_guano_chunk(path: Path, metadata: bytes) -> None:
    """Append a `guan` RIFF sub-chunk to a WAV file and fix the RIFF size."""
    payload = metadata + (b"\x00" if len(metadata) % 2 else b"")
    with path.open("r+b") as handle:
        header = handle.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            raise StorageError(f"{path.name} is not a RIFF/WAVE file")
        handle.seek(0, os.SEEK_END)
        handle.write(b"guan" + struct.pack("<I", len(metadata)) + payload)
        riff_size = handle.tell() - 8
        handle.seek(4)
        handle.write(struct.pack("<I", riff_size))


def read_guano(path: Path) -> dict[str, str]:
    """The GUANO fields of a WAV file as 'Namespace|Key' -> text (for tests and tools)."""
    md = guano.GuanoFile(str(path))
    return {
        (f"{namespace}|{key}" if namespace else key): str(value)
        for namespace, key, value in md.items_namespaced()
    }


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _identity_comment(event_id: str, seq: int) -> str:
    """The text field written when an event's file is opened: a crash leaves it readable."""
    return f"event_id={event_id} seq={seq}"


def _event_id_from_comment(comment: str, seq: int) -> str | None:
    """The event id a partial file's comment names, if it is that of event `seq`."""
    fields = dict(part.partition("=")[::2] for part in comment.split())
    event_id = fields.get("event_id")
    if fields.get("seq") != str(seq) or not is_valid_event_id(event_id):
        return None
    return event_id


def _read_what_is_there(partial: Any) -> npt.NDArray[np.float32]:
    """The audio of a file cut by a crash, block by block. A FLAC file whose header was never
    finished has no length (libsndfile says 2**63-1 frames) and its reading fails where the
    encoder had got to: what was read up to there is the audio."""
    blocks: list[npt.NDArray[np.float32]] = []
    try:
        # Small blocks: a read that runs into the end fails whole, losing what it had read.
        for block in partial.blocks(blocksize=4096, dtype="float32", always_2d=True):
            blocks.append(block)
    except (RuntimeError, sf.LibsndfileError):
        if not blocks:
            raise
    if not blocks:
        return np.zeros((0, partial.channels), dtype=np.float32)
    return np.concatenate(blocks)


def salvage_partial_file(pending: Path, device_id: str) -> EventRecord | None:
    """Turn a `.part` file left by a crash into a finished event record, if it holds audio.

    The file name carries the onset time and seq; libsndfile reads WAV/FLAC files whose header
    was never finalised. The audio is rewritten (so the header is right) under the same `.part`
    name; None if the file holds no audio.
    """
    final_name = pending.name[1 : -len(PART_SUFFIX)]
    stem, _, extension = final_name.rpartition(".")
    try:
        name_device, stamp, seq_text = stem.rsplit("_", 2)
        onset = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
        seq = int(seq_text)
    except ValueError as exc:
        raise StorageError(f"{pending.name} is not an event file name") from exc
    try:
        with sf.SoundFile(str(pending)) as partial:
            samplerate, comment, subtype = partial.samplerate, partial.comment, partial.subtype
            data = _read_what_is_there(partial)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise StorageError(f"{pending.name} cannot be read: {exc}") from exc
    if data.shape[0] == 0:
        return None
    subtype = subtype if subtype in ("PCM_16", "PCM_24", "FLOAT") else "PCM_16"
    recording = RecordingSettings(
        format=extension if extension == "flac" else "wav",
        subtype=subtype,
        pre_roll_s=0.0,
        post_roll_s=0.0,
    )
    meta = EventMeta(
        # The id its `start` message already carried: the controller then sees one event.
        event_id=_event_id_from_comment(comment, seq) or new_event_id(),
        seq=seq,
        device_id=name_device or device_id,
        onset_time=onset,
        file_start_time=onset,
        samplerate=int(samplerate),
        channels=int(data.shape[1]),
        recording=recording,
        detector=DetectorSettings(),
    )
    rewritten = pending.with_name(pending.name + ".salvage")
    writer = EventWriter(meta, pending.parent)
    writer.part_path = rewritten
    writer.open()
    writer.write(data)
    duration = timedelta(seconds=data.shape[0] / samplerate)
    record = writer.finish(
        offset_time=onset + duration,
        peak_dbfs=float(20 * np.log10(float(np.max(np.abs(data))) + 1e-12)),
        # Unknown after a crash: the detector's floor was not saved with the partial file.
        noise_floor_dbfs=-120.0,
        split=False,
        clock_uncertain=True,
    )
    rewritten.replace(pending)
    return record
