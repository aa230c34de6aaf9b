"""The local archive: `<root>/<device_id>/<YYYY-MM-DD>/<event file>` plus a JSON sidecar.

The audio file reaches its final name only once verified (the websocket client writes a hidden
`.part` file and renames it); the sidecar `<event file>.json` is written aside and renamed
after that, so a sidecar always means "this file is complete and its sha256 was checked".

Claims (`<root>/.claims/<event_id>`, created with O_EXCL) keep controllers that share the
archive (a shared-subscription group, or a `fetch` next to `run`) from downloading the same file
twice. A claim names its holder: the controller id, the host and the process id, so two
processes with one controller id (`run` and `fetch`) are different holders. While a claim is
held, its mtime is refreshed every quarter of `claim_timeout_s` (a daemon thread, running only
while claims are held), so only a claim nobody refreshes any more is taken over after
`claim_timeout_s`. A claim left by a process of this host that is gone (killed in mid-download)
is taken over at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.errors import ControllerError
from edge.fileio import fsync_dir
from edge.messages.common import EventRecord
from edge.timeutil import iso_utc, utc_now

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
CLAIMS_DIR = ".claims"
SIDECAR_VERSION = 1
MIN_CLAIM_REFRESH_S = 0.05  # claims are refreshed every claim_timeout_s/4, at most this often


class ArchiveError(ControllerError):
    """The archive cannot be written."""


class ArchiveFullError(ArchiveError):
    """The archive disk has less free space than `min_free_mb` plus the file."""


@dataclass(frozen=True, slots=True)
class ClaimHolder:
    """Who holds a claim: a controller process. `host`/`pid` are empty/0 in claims written by
    versions that stored only the controller id."""

    controller_id: str
    host: str = ""
    pid: int = 0

    @classmethod
    def parse(cls, text: str) -> ClaimHolder:
        try:
            document = json.loads(text)
        except ValueError:
            return cls(text.strip())  # an older claim: the controller id alone
        if not isinstance(document, dict):
            return cls(text.strip())
        pid = document.get("pid")
        return cls(
            str(document.get("controller_id", "")),
            str(document.get("host", "")),
            pid if isinstance(pid, int) else 0,
        )

    def dump(self) -> str:
        return json.dumps({"controller_id": self.controller_id, "host": self.host, "pid": self.pid})

    def is_gone(self) -> bool:
        """A process of this host that no longer runs (an older claim of ours counts too:
        the process that wrote it is gone, since this version writes host and pid)."""
        if not self.pid or self.host != socket.gethostname():
            return False
        if sys.platform == "win32":
            return False  # os.kill(pid, 0) would terminate it there: wait for the timeout
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # EPERM: it runs, under another user
        return False

    def __str__(self) -> str:
        if not self.pid:
            return self.controller_id or "another controller"
        return f"{self.controller_id} (pid {self.pid} on {self.host})"


class Archive:
    """Where verified event files and their sidecars live."""

    def __init__(
        self, root: Path, controller_id: str, min_free_bytes: int, claim_timeout_s: float
    ) -> None:
        self.root = root
        self.controller_id = controller_id
        self.min_free_bytes = min_free_bytes
        self.claim_timeout_s = claim_timeout_s
        self.holder = ClaimHolder(controller_id, socket.gethostname(), os.getpid())
        self._claims = root / CLAIMS_DIR
        # Claims this process holds, refreshed by the keeper thread while there are any.
        self._held: set[str] = set()
        self._held_changed = threading.Condition()
        self._keeper: threading.Thread | None = None

    def open(self) -> None:
        try:
            self._claims.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create the archive {self.root}: {exc}") from exc
        self._drop_stale_own_claims()

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
            # The database marks the event archived and the agent is acked next: the sidecar
            # must survive a power cut from now on.
            fsync_dir(sidecar.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise ArchiveError(f"cannot write {sidecar}: {exc}") from exc
        return sidecar

    # -- claims -----------------------------------------------------------------------------------

    def claim(self, event_id: str) -> str | None:
        """Take the download of `event_id`; None if taken, else who holds it.

        A claim of another holder is taken over only if its process is gone (this host) or
        nobody refreshed it for `claim_timeout_s`. The claim is refreshed until `release`.
        """
        path = self._claims / event_id
        mine = self.holder.dump().encode("utf-8")
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, age_s = self._claim_holder(path)
                if holder is None:
                    continue  # released meanwhile
                if holder == self.holder or self._is_stale(holder, age_s):
                    logger.info("taking over the claim of %s on event %s", holder, event_id)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                # The pid and host only where the controller id alone cannot tell (`fetch`
                # while `run` collects).
                same_id = holder.controller_id == self.controller_id
                return str(holder) if same_id else holder.controller_id or "another controller"
            except OSError as exc:
                raise ArchiveError(f"cannot claim {event_id} in {self._claims}: {exc}") from exc
            try:
                os.write(fd, mine)
            finally:
                os.close(fd)
            self._hold(event_id)
            return None
        return "another controller"

    def release(self, event_id: str) -> None:
        """Give the claim up (only if it is still this process's)."""
        self._unhold(event_id)
        path = self._claims / event_id
        holder, _ = self._claim_holder(path)
        if holder == self.holder:
            with contextlib.suppress(OSError):
                path.unlink()

    def close(self) -> None:
        """Release every claim still held and stop refreshing."""
        with self._held_changed:
            held = sorted(self._held)
        for event_id in held:
            self.release(event_id)

    def _is_stale(self, holder: ClaimHolder, age_s: float) -> bool:
        if holder.is_gone():
            return True  # its process died (killed in mid-download): no need to wait
        if not holder.pid and holder.controller_id == self.controller_id:
            return True  # ours, written before holders had a pid: from an earlier run
        return age_s > self.claim_timeout_s

    def _claim_holder(self, path: Path) -> tuple[ClaimHolder | None, float]:
        """The holder of the claim at `path` and its age (since its last refresh); None if
        there is no claim. A claim being written (empty) is nobody's yet: it is fresh."""
        try:
            text = path.read_text(encoding="utf-8")
            age_s = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        except OSError:
            return ClaimHolder(""), 0.0
        return ClaimHolder.parse(text), age_s

    def _drop_stale_own_claims(self) -> None:
        """Claims a previous run of this controller left behind (killed mid-download): its
        process is gone (or it wrote the older claims without a pid). Claims of a process
        still running with this controller id (`run` while `fetch` starts) are kept."""
        for path in self._claims.iterdir():
            holder, _ = self._claim_holder(path)
            if holder is None or holder.controller_id != self.controller_id:
                continue
            if holder == self.holder or holder.is_gone() or not holder.pid:
                with contextlib.suppress(OSError):
                    path.unlink()

    # -- keeping claims fresh -----------------------------------------------------------------

    def _hold(self, event_id: str) -> None:
        with self._held_changed:
            self._held.add(event_id)
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._on_keep_claims, name="archive-claims", daemon=True
                )
                self._keeper.start()

    def _unhold(self, event_id: str) -> None:
        with self._held_changed:
            self._held.discard(event_id)
            self._held_changed.notify_all()

    def _on_keep_claims(self) -> None:
        """Keeper thread: refresh the mtime of every claim held, every quarter of the claim
        timeout; ends once no claim is held."""
        interval_s = max(self.claim_timeout_s / 4, MIN_CLAIM_REFRESH_S)
        while True:
            with self._held_changed:
                self._held_changed.wait_for(lambda: not self._held, timeout=interval_s)
                if not self._held:
                    self._keeper = None
                    return
                held = sorted(self._held)
            for event_id in held:
                self._refresh(event_id)

    def _refresh(self, event_id: str) -> None:
        path = self._claims / event_id
        holder, _ = self._claim_holder(path)
        if holder != self.holder:
            with self._held_changed:
                if event_id not in self._held:
                    return  # released meanwhile
                self._held.discard(event_id)
            logger.warning(
                "the claim on event %s is no longer ours (now %s)", event_id, holder or "none"
            )
            return
        try:
            os.utime(path)
        except OSError as exc:
            logger.warning("cannot refresh the claim on event %s: %s", event_id, exc)
