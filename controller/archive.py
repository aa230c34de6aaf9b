"""The local archive: `<root>/<device_id>/<YYYY-MM-DD>/<event file>` plus a JSON sidecar.

The audio file reaches its final name only once verified (the websocket client writes a hidden
`.part` file and renames it); the sidecar `<event file>.json` is written aside and renamed
after that, so a sidecar always means "this file is complete and its sha256 was checked".

Claims (`<root>/.claims/<event_id>`, created with O_EXCL) keep controllers that share the
archive (a shared-subscription group) from downloading the same file twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from controller.errors import ControllerError
from edge.messages.common import EventRecord
from edge.timeutil import iso_utc, utc_now

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
CLAIMS_DIR = ".claims"
SIDECAR_VERSION = 1


class ArchiveError(ControllerError):
    """The archive cannot be written."""


class ArchiveFullError(ArchiveError):
    """The archive disk has less free space than `min_free_mb` plus the file."""


class Archive:
    """Where verified event files and their sidecars live."""

    def __init__(
        self, root: Path, controller_id: str, min_free_bytes: int, claim_timeout_s: float
    ) -> None:
        self.root = root
        self.controller_id = controller_id
        self.min_free_bytes = min_free_bytes
        self.claim_timeout_s = claim_timeout_s
        self._claims = root / CLAIMS_DIR

    def open(self) -> None:
        try:
            self._claims.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create the archive {self.root}: {exc}") from exc
        self._drop_own_claims()

    # -- paths ------------------------------------------------------------------------------------

    def directory_for(self, record: EventRecord) -> Path:
        """`<root>/<device_id>/<YYYY-MM-DD>` of the event's onset (UTC)."""
        return self.root / record.device_id / record.onset_time.strftime("%Y-%m-%d")

    def file_path(self, record: EventRecord) -> Path:
        if record.file is None:
            raise ArchiveError(f"event {record.event_id} has no file")
        return self.directory_for(record) / record.file.name

    @staticmethod
    def sidecar_of(path: Path) -> Path:
        return path.with_name(path.name + SIDECAR_SUFFIX)

    def is_archived(self, record: EventRecord) -> Path | None:
        """The archived file if this event is complete here (sidecar with the same sha256)."""
        if record.file is None:
            return None
        path = self.file_path(record)
        try:
            sidecar = json.loads(self.sidecar_of(path).read_text(encoding="utf-8"))
            size = path.stat().st_size
        except (OSError, ValueError):
            return None
        file_meta = sidecar.get("file") if isinstance(sidecar, dict) else None
        if not isinstance(file_meta, dict) or file_meta.get("sha256") != record.file.sha256:
            return None
        return path if size == record.file.size_bytes else None

    # -- space ------------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def ensure_space(self, needed_bytes: int) -> None:
        """Raise ArchiveFullError if writing `needed_bytes` would go below `min_free_bytes`."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            raise ArchiveError(f"cannot read the free space of {self.root}: {exc}") from exc
        if free - needed_bytes < self.min_free_bytes:
            raise ArchiveFullError(
                f"archive disk full: {free / 1e6:.1f} MB free in {self.root}, a file of "
                f"{needed_bytes / 1e6:.1f} MB would leave less than the "
                f"{self.min_free_bytes / 1e6:.0f} MB kept free "
                "(SOUNDEDGE_CONTROLLER_COLLECTOR__MIN_FREE_MB)"
            )

    def prepare_directory(self, record: EventRecord) -> Path:
        directory = self.directory_for(record)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create {directory}: {exc}") from exc
        return directory

    # -- sidecars ---------------------------------------------------------------------------------

    def write_sidecar(self, path: Path, record: EventRecord, source_url: str) -> Path:
        """Write `<file>.json` atomically: the record, where it came from, who verified it."""
        document: dict[str, Any] = {
            "sidecar_version": SIDECAR_VERSION,
            **record.model_dump(mode="json"),
            "archived_at": iso_utc(utc_now()),
            "collected_by": self.controller_id,
            "source_url": source_url,
            "sha256_verified": True,
        }
        sidecar = self.sidecar_of(path)
        temporary = sidecar.with_name(f".{sidecar.name}.tmp")
        try:
            with temporary.open("w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(sidecar)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise ArchiveError(f"cannot write {sidecar}: {exc}") from exc
        return sidecar

    # -- claims -----------------------------------------------------------------------------------

    def claim(self, event_id: str) -> str | None:
        """Take the download of `event_id`; None if taken, else who holds it."""
        path = self._claims / event_id
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, age_s = self._claim_holder(path)
                if holder == self.controller_id or age_s > self.claim_timeout_s:
                    # Ours from an earlier run, or abandoned: take it over.
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                return holder or "another controller"
            except OSError as exc:
                raise ArchiveError(f"cannot claim {event_id} in {self._claims}: {exc}") from exc
            try:
                os.write(fd, self.controller_id.encode("utf-8"))
            finally:
                os.close(fd)
            return None
        return "another controller"

    def release(self, event_id: str) -> None:
        with contextlib.suppress(OSError):
            (self._claims / event_id).unlink()

    def _claim_holder(self, path: Path) -> tuple[str, float]:
        try:
            holder = path.read_text(encoding="utf-8").strip()
            age_s = time.time() - path.stat().st_mtime
        except OSError:
            return "", 0.0
        return holder, age_s

    def _drop_own_claims(self) -> None:
        """Claims left by this controller's previous run (it was killed mid-download)."""
        for path in self._claims.iterdir():
            holder, _ = self._claim_holder(path)
            if holder == self.controller_id:
                with contextlib.suppress(OSError):
                    path.unlink()
