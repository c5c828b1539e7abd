"""Stored data that is not what was acknowledged is reported and not served as if intact.

Two checks, both reported the same way (one log line, ``medverse_integrity_failures_total``,
the ``integrity`` section of ``/health``, whose ``status`` becomes ``degraded``, and an audit
entry):

- **Model files.** A stored asset is named by its SHA-256; a file whose content no longer
  hashes to its name (a flipped bit, a truncated copy, an edit behind the server's back) is
  refused with ``corrupt`` when downloaded (:class:`~.assets.AssetService` checks before
  serving) and found by :class:`AssetScrub`, a background pass that re-reads every file at low
  priority (``asset_scrub_interval``). A file found intact again (restored from a backup, or
  uploaded again) is served again, and that is recorded too.
- **Objects and annotations.** At start the audit log's record of acknowledged object and
  annotation changes (``object_spawned``/``object_removed``, ``annotation_created``/
  ``annotation_deleted``: each is recorded only after its change was committed) is replayed and
  compared with the object store. A room whose store lacks an acknowledged object or
  annotation, or still holds one whose removal was acknowledged (a damaged WAL, a database
  restored from an older copy), is held back: its objects are not opened and every object
  operation in it is refused with ``corrupt``, unless ``serve_incomplete_objects`` is set. An
  operator who serves such a room anyway accepts its state: that is recorded
  (``objects_gap_accepted``) and the room is not reported again for what was lost before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from .assets import AssetStore
from .audit import DB_FILE, AuditSource, SQLiteAuditSource
from .store import ObjectStore

log = logging.getLogger("medverse.integrity")

#: Bytes a second the background scrub reads at most, so it never competes with downloads
#: for the disk (a 100 MB model takes about 2 s).
SCRUB_BYTES_PER_SECOND = 48 * 1024 * 1024
#: Seconds between the two looks at a shared store's gaps (see :meth:`Integrity.check_objects`).
RECHECK_DELAY = 1.0
#: Seconds after start before the first scrub pass (the start is busy: rooms come back).
FIRST_SCRUB_DELAY = 60.0

# Audit entries the object replay reads (see the module docstring).
_OBJECT_KINDS = (
    "object_spawned",
    "object_removed",
    "annotation_created",
    "annotation_edited",
    "annotation_deleted",
    "objects_gap_accepted",
)


@dataclass
class RoomGap:
    """What a room's stored objects lack, against the audit log's acknowledged changes."""

    room: str
    #: Acknowledged objects and annotations that are not stored.
    missing_objects: list[int] = field(default_factory=list)
    missing_annotations: list[int] = field(default_factory=list)
    #: Stored objects and annotations whose acknowledged removal is not.
    unremoved_objects: list[int] = field(default_factory=list)
    unremoved_annotations: list[int] = field(default_factory=list)
    #: Whether the room's objects are served anyway (``serve_incomplete_objects``).
    served: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.missing_objects
            or self.missing_annotations
            or self.unremoved_objects
            or self.unremoved_annotations
        )

    def summary(self) -> str:
        """One line: what is missing, by id (the first few)."""

        def ids(values: list[int]) -> str:
            shown = ", ".join(str(v) for v in values[:8])
            return shown + (f" and {len(values) - 8} more" if len(values) > 8 else "")

        parts = [
            f"{len(v)} {what} ({ids(v)})"
            for what, v in (
                ("acknowledged objects missing", self.missing_objects),
                ("acknowledged annotations missing", self.missing_annotations),
                ("removed objects back", self.unremoved_objects),
                ("deleted annotations back", self.unremoved_annotations),
            )
            if v
        ]
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "missing_objects": self.missing_objects,
            "missing_annotations": self.missing_annotations,
            "unremoved_objects": self.unremoved_objects,
            "unremoved_annotations": self.unremoved_annotations,
            "served": self.served,
        }


def find_gaps(
    store: ObjectStore, audit: str | Path | AuditSource | None, rooms: set[str] | None = None
) -> dict[str, RoomGap]:
    """Replay the audit log's object and annotation entries (a data directory's, or an
    :class:`~.audit.AuditSource`) and compare the object store's rooms (or only ``rooms``)
    with them: the rooms whose stored state lacks acknowledged changes. Blocking."""
    if audit is None:
        return {}
    if not isinstance(audit, AuditSource):
        if not (Path(audit) / DB_FILE).is_file():
            return {}
        audit = SQLiteAuditSource(audit)
    try:
        rows = audit.object_entries(_OBJECT_KINDS)
    finally:
        audit.close()
    # Per room: object ids acknowledged present and removed; annotation id -> its object, and
    # annotation ids acknowledged deleted (with their object's removal, or on their own).
    objects: dict[str, set[int]] = {}
    removed: dict[str, set[int]] = {}
    annotations: dict[str, dict[int, int]] = {}
    deleted: dict[str, set[int]] = {}
    for kind, room, subject, detail in rows:
        if kind == "objects_gap_accepted":  # an operator accepted the room's stored state
            for table in (objects, removed, annotations, deleted):
                table.pop(room, None)
            continue
        prefix, _, number = (subject or "").partition(":")
        if not number.isdigit():
            continue
        ident = int(number)
        room_objects, room_removed = (
            objects.setdefault(room, set()),
            removed.setdefault(room, set()),
        )
        room_annos, room_deleted = annotations.setdefault(room, {}), deleted.setdefault(room, set())
        if kind == "object_spawned" and prefix == "object":
            room_objects.add(ident)
            room_removed.discard(ident)
        elif kind == "object_removed" and prefix == "object":
            room_objects.discard(ident)
            room_removed.add(ident)
            for aid in [a for a, oid in room_annos.items() if oid == ident]:
                del room_annos[aid]
                room_deleted.add(aid)
        elif kind in ("annotation_created", "annotation_edited") and prefix == "annotation":
            try:
                oid = json.loads(detail or "{}").get("object")
            except (ValueError, AttributeError):
                oid = None
            if isinstance(oid, int):
                room_annos[ident] = oid
                room_deleted.discard(ident)
        elif kind == "annotation_deleted" and prefix == "annotation":
            room_annos.pop(ident, None)
            room_deleted.add(ident)
    gaps: dict[str, RoomGap] = {}
    for room in objects:
        if rooms is not None and room not in rooms:
            continue
        record = store.load_room(room)
        stored_objects = {o.id for o in record.objects}
        stored_annos = {a.id for a in record.annotations}
        gap = RoomGap(
            room,
            sorted(objects[room] - stored_objects),
            sorted(set(annotations[room]) - stored_annos),
            sorted(removed[room] & stored_objects),
            sorted(deleted[room] & stored_annos),
        )
        if gap:
            gaps[room] = gap
    return gaps


class Integrity:
    """This server's integrity reports: damaged model files and rooms held back."""

    def __init__(self, registry: CollectorRegistry, audit: Callable[..., None]) -> None:
        self._audit = audit
        #: sha256 -> what is wrong with its stored file, and since when (Unix time).
        self.corrupt_assets: dict[str, tuple[str, float]] = {}
        self.rooms: dict[str, RoomGap] = {}
        self.scrub_passes = 0
        self.last_scrub: float | None = None
        self.failures = Counter(
            "medverse_integrity_failures_total",
            "Stored data found not to be what was acknowledged, by kind (asset: a model file "
            "differs from its SHA-256; objects: a room's store lacks acknowledged changes)",
            ["kind"],
            registry=registry,
        )
        self.scrubbed = Counter(
            "medverse_asset_scrub_files_total",
            "Stored model files re-read and checked by the background scrub",
            registry=registry,
        )
        Gauge(
            "medverse_corrupt_assets",
            "Stored model files known not to match their hash (not served)",
            registry=registry,
        ).set_function(lambda: len(self.corrupt_assets))
        Gauge(
            "medverse_incomplete_rooms",
            "Rooms whose stored objects lack acknowledged changes",
            registry=registry,
        ).set_function(lambda: len(self.rooms))

    @property
    def ok(self) -> bool:
        return not self.corrupt_assets and not self.rooms

    # ----------------------------------------------------------------- model files

    def asset_checked(self, sha256: str, problem: str | None, how: str) -> None:
        """What a check of a stored model file found (on the event loop): a new problem is
        logged, counted and audited once; a file found intact again likewise."""
        known = self.corrupt_assets.get(sha256)
        if problem is None:
            if known is not None:
                del self.corrupt_assets[sha256]
                log.warning("asset %s is intact again (found by %s): served again", sha256, how)
                self._audit("asset_intact", subject=sha256, found_by=how)
            return
        if known is not None:
            return
        self.corrupt_assets[sha256] = (problem, time.time())
        self.failures.labels("asset").inc()
        log.error("asset %s is damaged and is not served: %s (found by %s)", sha256, problem, how)
        self._audit("asset_corrupt", subject=sha256, problem=problem, found_by=how)

    def scrub_done(self, stored: set[str]) -> None:
        """A scrub pass ended; files no longer stored are no longer damaged ones."""
        self.scrub_passes += 1
        self.last_scrub = time.time()
        for sha in [s for s in self.corrupt_assets if s not in stored]:
            del self.corrupt_assets[sha]

    # ----------------------------------------------------------------- objects

    async def check_objects(
        self,
        store: ObjectStore,
        audit: Callable[[], AuditSource | None],
        hold_back: Callable[[str, str], None],
        serve_anyway: bool,
        recheck: bool = False,
    ) -> None:
        """Compare ``store`` with the audit log (``audit()`` opens it to read; in a thread),
        report every room that lacks acknowledged changes, and hold its objects back
        (``hold_back(room, why)``) unless ``serve_anyway``.

        With ``recheck`` (a store and log shared by several servers), a room is reported only
        if it shows the same gap again a moment later: another server may be changing it now,
        and between its commit and its audit entry the two differ for a few milliseconds."""
        t0 = time.monotonic()
        try:
            gaps = await asyncio.to_thread(lambda: find_gaps(store, audit()))
            if gaps and recheck:
                await asyncio.sleep(RECHECK_DELAY)
                again = await asyncio.to_thread(lambda: find_gaps(store, audit(), set(gaps)))
                gaps = {r: g for r, g in gaps.items() if again.get(r) == g}
        except (sqlite3.Error, OSError) as exc:
            # The server still starts: an unreadable audit log is its own problem to report.
            log.error("objects could not be checked against the audit log: %s", exc)
            return
        for room, gap in sorted(gaps.items()):
            gap.served = serve_anyway
            self.rooms[room] = gap
            self.failures.labels("objects").inc()
            what = gap.summary()
            self._audit(
                "objects_incomplete",
                room=room,
                missing_objects=len(gap.missing_objects),
                missing_annotations=len(gap.missing_annotations),
                unremoved_objects=len(gap.unremoved_objects),
                unremoved_annotations=len(gap.unremoved_annotations),
                served=serve_anyway,
            )
            if serve_anyway:
                log.error(
                    "room %s: its stored objects lack acknowledged changes: %s; served anyway "
                    "(serve_incomplete_objects), and accepted as they are",
                    room,
                    what,
                )
                self._audit("objects_gap_accepted", room=room)
            else:
                log.error(
                    "room %s: its stored objects lack acknowledged changes: %s; its objects "
                    "are refused until an operator restores them or sets "
                    "serve_incomplete_objects",
                    room,
                    what,
                )
                hold_back(room, f"this room's stored objects are incomplete: {what}")
        log.debug("objects checked against the audit log in %.3f s", time.monotonic() - t0)

    # ----------------------------------------------------------------- /health

    def health(self) -> dict[str, object]:
        """The ``integrity`` section of ``/health``."""
        return {
            "integrity": {
                "ok": self.ok,
                "corrupt_assets": {
                    sha: {"problem": problem, "since": round(since, 3)}
                    for sha, (problem, since) in sorted(self.corrupt_assets.items())
                },
                "incomplete_rooms": {
                    room: gap.to_json() for room, gap in sorted(self.rooms.items())
                },
                "scrub": {
                    "passes": self.scrub_passes,
                    "last": round(self.last_scrub, 3) if self.last_scrub is not None else None,
                },
            }
        }


class AssetScrub:
    """A background pass over every stored model file, re-reading and hashing it, at the
    lowest CPU priority and at most :data:`SCRUB_BYTES_PER_SECOND`, off the event loop (a
    thread of its own); what it finds goes to :meth:`Integrity.asset_checked` on the loop."""

    def __init__(self, store: AssetStore, integrity: Integrity, interval: float) -> None:
        self._store = store
        self._integrity = integrity
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        if self.interval <= 0:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="medverse-scrub", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _tell(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` on the event loop (the loop owns the reports and the audit log)."""
        if self._loop is not None and not self._stop.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        # Lowest CPU priority for this thread only (Linux schedules threads as tasks).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        wait = min(self.interval, FIRST_SCRUB_DELAY)
        while not self._stop.wait(wait):
            self.scrub_once()
            wait = self.interval

    def _pace(self, n: int) -> bool:
        """After ``n`` bytes read: wait so reading stays under the rate; False to stop."""
        return not self._stop.wait(n / SCRUB_BYTES_PER_SECOND)

    def scrub_once(self) -> None:
        """One pass over every stored file (blocking; returns early if stopped)."""
        try:
            hashes = self._store.blob_hashes()
        except Exception:  # SQLite's or PostgreSQL's (after its retries)
            log.warning("scrub: the asset database could not be read; next pass later")
            return
        for sha in hashes:
            if self._stop.is_set():
                return
            problem = self._store.check(sha, reread=True, pause=self._pace)
            if self._stop.is_set():
                return
            self._integrity.scrubbed.inc()
            self._tell(self._integrity.asset_checked, sha, problem, "scrub")
        self._tell(self._integrity.scrub_done, set(hashes))
