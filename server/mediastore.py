"""Durable metadata of uploaded models and image series, and the image viewers' state.

The files themselves (models, series volumes) are content-addressed in the blob directory
(:mod:`.assets`, :mod:`.imaging`); what rooms list, who uploaded what, and the viewer panels
and measurements of each room live here, behind two small interfaces with the same two
backends as the objects (:mod:`.store`):

* :class:`AssetIndex`: the models each room lists (and the stored files' sizes and glTF
  descriptions);
* :class:`SeriesIndex`: the image series each room lists, and each room's viewer panels,
  measurements and counters.

The embedded defaults keep SQLite files in the data directory (``assets/assets.sqlite3`` and
``images/images.sqlite3``, WAL, ``synchronous=FULL``: durable when a call returns). The
PostgreSQL backends (``--database-url``) keep the same tables in the cluster's database, so a
room that moves to another server (failover, drain) finds its models, series and viewer state
there. Every method is blocking: the server calls them from threads, never from its event
loop. On PostgreSQL each call is one statement (one round trip) unless its docstring says
otherwise; writes are idempotent, so :class:`~.pg.Database`'s retry after a lost answer does
no harm.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: A room's listing of a model: (sha256, name, size, uploader, uploaded_at, model JSON,
#: pseudonymous) (see :func:`medverse.server.assets._row_info`).
AssetRow = Sequence[Any]
#: A room's listing of a series: (sha256, name, size, uploader, uploaded_at, meta JSON,
#: pseudonymous) (see :func:`medverse.server.imaging._listing`).
SeriesRow = Sequence[Any]
AssetRows = list[AssetRow]
Hashes = list[str]
SeriesRows = list[SeriesRow]
#: A room's viewer state: (panels, measurements, next panel id, next measurement id, seq).
ViewerState = tuple[list[dict[str, Any]], list[dict[str, Any]], int, int, int]


class AssetIndex(ABC):
    """Which models each room lists, and what is known of each stored file."""

    @abstractmethod
    def info(self, room: str, sha256: str) -> AssetRow | None:
        """The model as ``room`` lists it (None: not listed there)."""

    @abstractmethod
    def list(self, room: str) -> AssetRows:
        """Every model ``room`` lists, oldest first."""

    @abstractmethod
    def add(
        self,
        room: str,
        sha256: str,
        size: int,
        model: str,
        name: str,
        uploader: str,
        subject: str,
        now: float,
        pseudonymous: bool,
    ) -> bool:
        """Record the stored file (once) and list it in ``room`` (once); durable on return.
        Whether it is new to the room."""

    @abstractmethod
    def remove(self, room: str, sha256: str) -> tuple[bool, bool]:
        """Unlist the model from ``room``: (whether it was listed, whether no room lists it
        any more, so its file record went too)."""

    @abstractmethod
    def stored_size(self, sha256: str) -> int | None:
        """The stored file's size (None: no room lists it)."""

    @abstractmethod
    def blob_hashes(self) -> Hashes:
        """Every stored file's hash."""

    @abstractmethod
    def totals(self) -> tuple[int, int]:
        """How many files are stored, and their bytes."""

    @abstractmethod
    def count(self, room: str) -> int:
        """How many models ``room`` lists."""

    @abstractmethod
    def uploader_subject(self, room: str, sha256: str) -> str | None:
        """The token subject of who listed the model in ``room``."""

    def close(self) -> None:  # noqa: B027 (nothing to release unless a backend says so)
        """Release what the index holds (the PostgreSQL database is the server's)."""


class SeriesIndex(ABC):
    """Which image series each room lists, and each room's viewer panels and measurements."""

    @abstractmethod
    def listing(self, room: str, sha256: str) -> SeriesRow | None:
        """The series as ``room`` lists it (None: not listed there)."""

    @abstractmethod
    def listings(self, room: str) -> SeriesRows:
        """Every series ``room`` lists, oldest first."""

    @abstractmethod
    def add(
        self,
        room: str,
        sha256: str,
        size: int,
        name: str,
        uploader: str,
        subject: str,
        now: float,
        meta: str,
        pseudonymous: bool,
    ) -> bool:
        """Record the stored file (once) and list it in ``room`` (once); durable on return.
        Whether it is new to the room. ``pseudonymous``: ``uploader`` is the pseudonym a
        pseudonymous room showed (else a real name, never shown in such a room)."""

    @abstractmethod
    def remove(self, room: str, sha256: str) -> tuple[bool, bool]:
        """As :meth:`AssetIndex.remove`."""

    @abstractmethod
    def count(self, room: str) -> int:
        """How many series ``room`` lists."""

    @abstractmethod
    def uploader_subject(self, room: str, sha256: str) -> str | None:
        """The token subject of who listed the series in ``room``."""

    @abstractmethod
    def load_viewer(self, room: str) -> ViewerState:
        """(panels, measurements, next panel id, next measurement id, seq) of ``room``, as of
        one moment."""

    @abstractmethod
    def put_panels(
        self, room: str, panels: list[dict[str, Any]], next_panel: int, next_m: int, seq: int
    ) -> None:
        """Insert or replace panel states (and the room's counters) in one transaction."""

    @abstractmethod
    def delete_panel(
        self, room: str, panel_id: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        """Delete a panel (and set the room's counters) in one transaction."""

    @abstractmethod
    def put_measurement(
        self, room: str, m: dict[str, Any], next_panel: int, next_m: int, seq: int
    ) -> None:
        """Insert or replace a measurement (and the room's counters) in one transaction."""

    @abstractmethod
    def delete_measurement(
        self, room: str, mid: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        """Delete a measurement (and set the room's counters) in one transaction."""

    def close(self) -> None:  # noqa: B027 (nothing to release unless a backend says so)
        """Release what the index holds (the PostgreSQL database is the server's)."""


# --------------------------------------------------------------------------- SQLite


def _sqlite(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Writes run in worker threads (they fsync); the index's lock serializes every use.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


_ASSET_SELECT = (
    "SELECT r.sha256, r.name, b.size, r.uploader, r.uploaded_at, b.model, r.pseudonymous "
    "FROM room_assets r JOIN blobs b USING (sha256) "
)


class _SQLite:
    """What both SQLite indexes share: one file, one lock, a room listing table (``_listed``)
    over a table of the files themselves (``_blobs``)."""

    _listed = ""
    _blobs = ""

    def __init__(self, path: Path) -> None:
        self._db = _sqlite(path)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def remove(self, room: str, sha256: str) -> tuple[bool, bool]:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                f"DELETE FROM {self._listed} WHERE room = ? AND sha256 = ?", (room, sha256)
            )
            if cur.rowcount == 0:
                return False, False
            left = self._db.execute(
                f"SELECT COUNT(*) FROM {self._listed} WHERE sha256 = ?", (sha256,)
            ).fetchone()[0]
            if left == 0:
                self._db.execute(f"DELETE FROM {self._blobs} WHERE sha256 = ?", (sha256,))
        return True, left == 0

    def count(self, room: str) -> int:
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM {self._listed} WHERE room = ?", (room,))
            return int(row.fetchone()[0])

    def uploader_subject(self, room: str, sha256: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT uploader_subject FROM {self._listed} WHERE room = ? AND sha256 = ?",
                (room, sha256),
            ).fetchone()
        return row[0] if row else None


class SQLiteAssetIndex(_SQLite, AssetIndex):
    """The embedded default: ``<data_dir>/assets/assets.sqlite3``."""

    _listed, _blobs = "room_assets", "blobs"

    def __init__(self, data_dir: str | Path) -> None:
        super().__init__(Path(data_dir) / "assets" / "assets.sqlite3")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS blobs (
                sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, model TEXT NOT NULL,
                stored_at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS room_assets (
                room TEXT NOT NULL, sha256 TEXT NOT NULL REFERENCES blobs(sha256),
                name TEXT NOT NULL, uploader TEXT NOT NULL, uploader_subject TEXT NOT NULL,
                uploaded_at REAL NOT NULL, PRIMARY KEY (room, sha256));
            """
        )
        # Whether ``uploader`` is a pseudonym (uploaded in a pseudonymous room), so a real name
        # is never shown in one; databases from before the column hold real names only.
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(room_assets)")}
        if "pseudonymous" not in columns:
            self._db.execute(
                "ALTER TABLE room_assets ADD COLUMN pseudonymous INTEGER NOT NULL DEFAULT 0"
            )

    def info(self, room: str, sha256: str) -> AssetRow | None:
        with self._lock:
            row: AssetRow | None = self._db.execute(
                _ASSET_SELECT + "WHERE r.room = ? AND r.sha256 = ?", (room, sha256)
            ).fetchone()
        return row

    def list(self, room: str) -> AssetRows:
        with self._lock:
            return self._db.execute(
                _ASSET_SELECT + "WHERE r.room = ? ORDER BY r.uploaded_at, r.sha256", (room,)
            ).fetchall()

    def add(
        self,
        room: str,
        sha256: str,
        size: int,
        model: str,
        name: str,
        uploader: str,
        subject: str,
        now: float,
        pseudonymous: bool,
    ) -> bool:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?)", (sha256, size, model, now)
            )
            cur = self._db.execute(
                "INSERT OR IGNORE INTO room_assets (room, sha256, name, uploader, "
                "uploader_subject, uploaded_at, pseudonymous) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (room, sha256, name, uploader, subject, now, int(pseudonymous)),
            )
            return cur.rowcount == 1

    def stored_size(self, sha256: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT size FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def blob_hashes(self) -> Hashes:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT sha256 FROM blobs ORDER BY sha256")]

    def totals(self) -> tuple[int, int]:
        with self._lock:
            files, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs"
            ).fetchone()
        return int(files), int(size)


_SERIES_SELECT = (
    "SELECT r.sha256, r.name, b.size, r.uploader, r.uploaded_at, r.meta, r.pseudonymous "
    "FROM room_series r JOIN series_blobs b USING (sha256) "
)


class SQLiteSeriesIndex(_SQLite, SeriesIndex):
    """The embedded default: ``<data_dir>/images/images.sqlite3``."""

    _listed, _blobs = "room_series", "series_blobs"

    def __init__(self, data_dir: str | Path) -> None:
        super().__init__(Path(data_dir) / "images" / "images.sqlite3")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS series_blobs (
                sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, stored_at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS room_series (
                room TEXT NOT NULL, sha256 TEXT NOT NULL, name TEXT NOT NULL,
                uploader TEXT NOT NULL, uploader_subject TEXT NOT NULL, uploaded_at REAL NOT NULL,
                meta TEXT NOT NULL, PRIMARY KEY (room, sha256));
            CREATE TABLE IF NOT EXISTS panels (
                room TEXT NOT NULL, id INTEGER NOT NULL, state TEXT NOT NULL,
                PRIMARY KEY (room, id));
            CREATE TABLE IF NOT EXISTS measurements (
                room TEXT NOT NULL, id INTEGER NOT NULL, state TEXT NOT NULL,
                PRIMARY KEY (room, id));
            CREATE TABLE IF NOT EXISTS counters (
                room TEXT PRIMARY KEY, next_panel INTEGER NOT NULL,
                next_measurement INTEGER NOT NULL, seq INTEGER NOT NULL);
            """
        )
        # As for models: whether ``uploader`` is a pseudonym; older databases hold real names.
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(room_series)")}
        if "pseudonymous" not in columns:
            self._db.execute(
                "ALTER TABLE room_series ADD COLUMN pseudonymous INTEGER NOT NULL DEFAULT 0"
            )

    def listing(self, room: str, sha256: str) -> SeriesRow | None:
        with self._lock:
            row: SeriesRow | None = self._db.execute(
                _SERIES_SELECT + "WHERE r.room = ? AND r.sha256 = ?", (room, sha256)
            ).fetchone()
        return row

    def listings(self, room: str) -> SeriesRows:
        with self._lock:
            return self._db.execute(
                _SERIES_SELECT + "WHERE r.room = ? ORDER BY r.uploaded_at, r.sha256", (room,)
            ).fetchall()

    def add(
        self,
        room: str,
        sha256: str,
        size: int,
        name: str,
        uploader: str,
        subject: str,
        now: float,
        meta: str,
        pseudonymous: bool,
    ) -> bool:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR IGNORE INTO series_blobs VALUES (?, ?, ?)", (sha256, size, now)
            )
            cur = self._db.execute(
                "INSERT OR IGNORE INTO room_series (room, sha256, name, uploader, "
                "uploader_subject, uploaded_at, meta, pseudonymous) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (room, sha256, name, uploader, subject, now, meta, int(pseudonymous)),
            )
            return cur.rowcount == 1

    def load_viewer(self, room: str) -> ViewerState:
        with self._lock:
            panels = [
                json.loads(r[0])
                for r in self._db.execute(
                    "SELECT state FROM panels WHERE room = ? ORDER BY id", (room,)
                )
            ]
            measurements = [
                json.loads(r[0])
                for r in self._db.execute(
                    "SELECT state FROM measurements WHERE room = ? ORDER BY id", (room,)
                )
            ]
            row = self._db.execute(
                "SELECT next_panel, next_measurement, seq FROM counters WHERE room = ?", (room,)
            ).fetchone()
        if row is None:
            return panels, measurements, 1, 1, 0
        return panels, measurements, int(row[0]), int(row[1]), int(row[2])

    def put_panels(
        self, room: str, panels: list[dict[str, Any]], next_panel: int, next_m: int, seq: int
    ) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO panels VALUES (?, ?, ?)",
                [(room, p["panel_id"], json.dumps(p)) for p in panels],
            )
            self._counters(room, next_panel, next_m, seq)

    def delete_panel(
        self, room: str, panel_id: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM panels WHERE room = ? AND id = ?", (room, panel_id))
            self._counters(room, next_panel, next_m, seq)

    def put_measurement(
        self, room: str, m: dict[str, Any], next_panel: int, next_m: int, seq: int
    ) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO measurements VALUES (?, ?, ?)",
                (room, m["measurement_id"], json.dumps(m)),
            )
            self._counters(room, next_panel, next_m, seq)

    def delete_measurement(
        self, room: str, mid: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM measurements WHERE room = ? AND id = ?", (room, mid))
            self._counters(room, next_panel, next_m, seq)

    def _counters(self, room: str, next_panel: int, next_m: int, seq: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO counters VALUES (?, ?, ?, ?)", (room, next_panel, next_m, seq)
        )


# --------------------------------------------------------------------------- PostgreSQL

#: The tables, created by :mod:`.pg` as schema version 2 (under its advisory lock;
#: :data:`PG_SERIES_PSEUDONYMOUS`, version 3, adds a column to databases made before it).
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS asset_blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    model TEXT NOT NULL,
    stored_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS room_assets (
    room TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    uploader TEXT NOT NULL,
    uploader_subject TEXT NOT NULL,
    uploaded_at DOUBLE PRECISION NOT NULL,
    pseudonymous INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room, sha256)
);
CREATE INDEX IF NOT EXISTS room_assets_by_sha256 ON room_assets (sha256);
CREATE TABLE IF NOT EXISTS series_blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    stored_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS room_series (
    room TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    uploader TEXT NOT NULL,
    uploader_subject TEXT NOT NULL,
    uploaded_at DOUBLE PRECISION NOT NULL,
    meta TEXT NOT NULL,
    pseudonymous INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room, sha256)
);
CREATE INDEX IF NOT EXISTS room_series_by_sha256 ON room_series (sha256);
CREATE TABLE IF NOT EXISTS image_panels (
    room TEXT NOT NULL,
    id BIGINT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE TABLE IF NOT EXISTS image_measurements (
    room TEXT NOT NULL,
    id BIGINT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE TABLE IF NOT EXISTS image_counters (
    room TEXT PRIMARY KEY,
    next_panel BIGINT NOT NULL,
    next_measurement BIGINT NOT NULL,
    seq BIGINT NOT NULL
);
"""


#: Series listings record whether their uploader is a pseudonym (as models' do), so a real
#: name is never shown in a pseudonymous room; older listings hold real names.
PG_SERIES_PSEUDONYMOUS = (
    "ALTER TABLE room_series ADD COLUMN IF NOT EXISTS pseudonymous INTEGER NOT NULL DEFAULT 0"
)


class _Postgres:
    """One statement per call, on the server's :class:`~.pg.Database`."""

    def __init__(self, db: Any) -> None:
        #: The server's :class:`~.pg.Database` (not imported here: the room plugin API,
        #: which imports this module, does not depend on asyncpg).
        self.db = db

    def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async def run(conn: Any) -> list[Any]:
            return list(await conn.fetch(sql, *args))

        return self.db.run(run)

    def _row(self, sql: str, *args: Any) -> Any:
        async def run(conn: Any) -> Any:
            return await conn.fetchrow(sql, *args)

        return self.db.run(run)

    def _value(self, sql: str, *args: Any) -> Any:
        async def run(conn: Any) -> Any:
            return await conn.fetchval(sql, *args)

        return self.db.run(run)

    def _remove(self, blobs: str, listed: str, room: str, sha256: str) -> tuple[bool, bool]:
        """Unlist, and drop the file's record when no room lists it: one transaction that
        locks the file's record first, so two servers unlisting it from two rooms at once
        cannot both leave it behind (nor both miss the last listing)."""

        async def tx(conn: Any) -> tuple[bool, bool]:
            await conn.execute(f"SELECT 1 FROM {blobs} WHERE sha256 = $1 FOR UPDATE", sha256)
            gone = await conn.fetchval(
                f"DELETE FROM {listed} WHERE room = $1 AND sha256 = $2 RETURNING 1", room, sha256
            )
            if gone is None:
                return False, False
            last = await conn.fetchval(
                f"WITH d AS (DELETE FROM {blobs} WHERE sha256 = $1 AND NOT EXISTS "
                f"(SELECT 1 FROM {listed} WHERE sha256 = $1) RETURNING 1) "
                "SELECT COUNT(*) FROM d",
                sha256,
            )
            return True, bool(last)

        return self.db.transaction(tx)


_PG_ASSET_SELECT = (
    "SELECT r.sha256, r.name, b.size, r.uploader, r.uploaded_at, b.model, r.pseudonymous "
    "FROM room_assets r JOIN asset_blobs b USING (sha256) "
)


class PostgresAssetIndex(_Postgres, AssetIndex):
    """The models rooms list, in the cluster's PostgreSQL database."""

    def info(self, room: str, sha256: str) -> AssetRow | None:
        return self._row(_PG_ASSET_SELECT + "WHERE r.room = $1 AND r.sha256 = $2", room, sha256)

    def list(self, room: str) -> AssetRows:
        return self._fetch(_PG_ASSET_SELECT + "WHERE r.room = $1 ORDER BY 5, 1", room)

    def add(
        self,
        room: str,
        sha256: str,
        size: int,
        model: str,
        name: str,
        uploader: str,
        subject: str,
        now: float,
        pseudonymous: bool,
    ) -> bool:
        # One statement: the file's record (once) and the room's listing (once).
        new = self._value(
            "WITH b AS (INSERT INTO asset_blobs (sha256, size, model, stored_at) "
            "VALUES ($2, $3, $4, $8) ON CONFLICT (sha256) DO NOTHING) "
            "INSERT INTO room_assets (room, sha256, name, uploader, uploader_subject, "
            "uploaded_at, pseudonymous) VALUES ($1, $2, $5, $6, $7, $8, $9) "
            "ON CONFLICT (room, sha256) DO NOTHING RETURNING 1",
            room,
            sha256,
            size,
            model,
            name,
            uploader,
            subject,
            now,
            int(pseudonymous),
        )
        return new is not None

    def remove(self, room: str, sha256: str) -> tuple[bool, bool]:
        """Three statements in one transaction (see :meth:`_Postgres._remove`)."""
        return self._remove("asset_blobs", "room_assets", room, sha256)

    def stored_size(self, sha256: str) -> int | None:
        size = self._value("SELECT size FROM asset_blobs WHERE sha256 = $1", sha256)
        return None if size is None else int(size)

    def blob_hashes(self) -> Hashes:
        return [r[0] for r in self._fetch("SELECT sha256 FROM asset_blobs ORDER BY sha256")]

    def totals(self) -> tuple[int, int]:
        row = self._row("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM asset_blobs")
        return int(row[0]), int(row[1])

    def count(self, room: str) -> int:
        return int(self._value("SELECT COUNT(*) FROM room_assets WHERE room = $1", room))

    def uploader_subject(self, room: str, sha256: str) -> str | None:
        return self._value(
            "SELECT uploader_subject FROM room_assets WHERE room = $1 AND sha256 = $2",
            room,
            sha256,
        )


_PG_SERIES_SELECT = (
    "SELECT r.sha256, r.name, b.size, r.uploader, r.uploaded_at, r.meta, r.pseudonymous "
    "FROM room_series r JOIN series_blobs b USING (sha256) "
)


def _pg_counters() -> str:
    """A CTE setting the room's viewer counters ($1 the room, $3-$5 the values; they never go
    back, so a late write of an older state cannot make ids be given out twice)."""
    return (
        "c AS (INSERT INTO image_counters (room, next_panel, next_measurement, seq) "
        "VALUES ($1, $3, $4, $5) ON CONFLICT (room) DO UPDATE SET "
        "next_panel = GREATEST(image_counters.next_panel, EXCLUDED.next_panel), "
        "next_measurement = GREATEST(image_counters.next_measurement, "
        "EXCLUDED.next_measurement), seq = GREATEST(image_counters.seq, EXCLUDED.seq))"
    )


class PostgresSeriesIndex(_Postgres, SeriesIndex):
    """The series rooms list and the rooms' viewer state, in the cluster's PostgreSQL."""

    def listing(self, room: str, sha256: str) -> SeriesRow | None:
        return self._row(_PG_SERIES_SELECT + "WHERE r.room = $1 AND r.sha256 = $2", room, sha256)

    def listings(self, room: str) -> SeriesRows:
        return self._fetch(_PG_SERIES_SELECT + "WHERE r.room = $1 ORDER BY 5, 1", room)

    def add(
        self,
        room: str,
        sha256: str,
        size: int,
        name: str,
        uploader: str,
        subject: str,
        now: float,
        meta: str,
        pseudonymous: bool,
    ) -> bool:
        new = self._value(
            "WITH b AS (INSERT INTO series_blobs (sha256, size, stored_at) VALUES ($2, $3, $7) "
            "ON CONFLICT (sha256) DO NOTHING) "
            "INSERT INTO room_series (room, sha256, name, uploader, uploader_subject, "
            "uploaded_at, meta, pseudonymous) VALUES ($1, $2, $4, $5, $6, $7, $8, $9) "
            "ON CONFLICT (room, sha256) DO NOTHING RETURNING 1",
            room,
            sha256,
            size,
            name,
            uploader,
            subject,
            now,
            meta,
            int(pseudonymous),
        )
        return new is not None

    def remove(self, room: str, sha256: str) -> tuple[bool, bool]:
        """Three statements in one transaction (see :meth:`_Postgres._remove`)."""
        return self._remove("series_blobs", "room_series", room, sha256)

    def count(self, room: str) -> int:
        return int(self._value("SELECT COUNT(*) FROM room_series WHERE room = $1", room))

    def uploader_subject(self, room: str, sha256: str) -> str | None:
        return self._value(
            "SELECT uploader_subject FROM room_series WHERE room = $1 AND sha256 = $2",
            room,
            sha256,
        )

    def load_viewer(self, room: str) -> ViewerState:
        # One statement, so panels, measurements and counters are of one snapshot.
        row = self._row(
            "SELECT "
            "(SELECT array_agg(state ORDER BY id) FROM image_panels WHERE room = $1), "
            "(SELECT array_agg(state ORDER BY id) FROM image_measurements WHERE room = $1), "
            "c.next_panel, c.next_measurement, c.seq "
            "FROM (SELECT 1) AS one LEFT JOIN image_counters c ON c.room = $1",
            room,
        )
        panels = [json.loads(s) for s in row[0] or ()]
        measurements = [json.loads(s) for s in row[1] or ()]
        if row[2] is None:
            return panels, measurements, 1, 1, 0
        return panels, measurements, int(row[2]), int(row[3]), int(row[4])

    def _with_counters(self, sql: str, room: str, arg: Any, counters: tuple[int, int, int]) -> None:
        async def run(conn: Any) -> None:
            await conn.execute(f"WITH {_pg_counters()} {sql}", room, arg, *counters)

        self.db.run(run)

    def put_panels(
        self, room: str, panels: list[dict[str, Any]], next_panel: int, next_m: int, seq: int
    ) -> None:
        states = [json.dumps(p) for p in panels]
        ids = [int(p["panel_id"]) for p in panels]

        async def run(conn: Any) -> None:
            await conn.execute(
                f"WITH {_pg_counters()} INSERT INTO image_panels (room, id, state) "
                "SELECT $1, x.id, x.state FROM unnest($2::bigint[], $6::text[]) AS x(id, state) "
                "ON CONFLICT (room, id) DO UPDATE SET state = EXCLUDED.state",
                room,
                ids,
                next_panel,
                next_m,
                seq,
                states,
            )

        self.db.run(run)

    def delete_panel(
        self, room: str, panel_id: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        self._with_counters(
            "DELETE FROM image_panels WHERE room = $1 AND id = $2",
            room,
            panel_id,
            (next_panel, next_m, seq),
        )

    def put_measurement(
        self, room: str, m: dict[str, Any], next_panel: int, next_m: int, seq: int
    ) -> None:
        async def run(conn: Any) -> None:
            await conn.execute(
                f"WITH {_pg_counters()} INSERT INTO image_measurements (room, id, state) "
                "VALUES ($1, $2, $6) ON CONFLICT (room, id) DO UPDATE SET state = EXCLUDED.state",
                room,
                int(m["measurement_id"]),
                next_panel,
                next_m,
                seq,
                json.dumps(m),
            )

        self.db.run(run)

    def delete_measurement(
        self, room: str, mid: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        self._with_counters(
            "DELETE FROM image_measurements WHERE room = $1 AND id = $2",
            room,
            mid,
            (next_panel, next_m, seq),
        )


__all__ = [
    "PG_SCHEMA",
    "PG_SERIES_PSEUDONYMOUS",
    "AssetIndex",
    "PostgresAssetIndex",
    "PostgresSeriesIndex",
    "SQLiteAssetIndex",
    "SQLiteSeriesIndex",
    "SeriesIndex",
]
