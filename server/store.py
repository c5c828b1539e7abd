"""Durable storage of shared objects and annotations, behind a small interface.

:class:`ObjectStore` is what the objects feature needs: load a room, and commit object and
annotation operations (each durable when the call returns) and batches of transforms. The
embedded default, :class:`SQLiteObjectStore`, keeps one SQLite file in the data directory
(WAL, ``synchronous=FULL``: a commit is on disk before the server acknowledges it, and a
``kill -9`` loses nothing committed). :class:`PostgresObjectStore` implements the same
methods on PostgreSQL (``--database-url``), for several servers sharing one state.

Every method is blocking; the server calls them from one dedicated writer thread, in order.
Operations that queue up while a commit is under way are committed together, in one
transaction, by :meth:`ObjectStore.run_batch` (group commit: one fsync, or one round trip, for
all of them), each still acknowledged only once that transaction is durable.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DB_FILE = "objects.sqlite3"

Vec3 = tuple[float, float, float]
Quat = tuple[float, float, float, float]


@dataclass(slots=True)
class StoredObject:
    """An object as stored: identity, transform and shared view state."""

    room: str
    id: int
    asset: str
    name: str
    author: str  # display name of the member who spawned it
    author_subject: str  # token subject of that member
    created: float
    position: Vec3
    rotation: Quat
    scale: float
    nodes: dict[str, bool] = field(default_factory=dict)
    plane: tuple[float, ...] = ()


@dataclass(slots=True)
class StoredAnnotation:
    """A pin, stroke or measurement in its object's local frame."""

    room: str
    id: int
    object_id: int
    kind: str
    points: tuple[Vec3, ...]
    text: str | None
    color: int | None
    author: str
    author_subject: str
    author_id: int
    created: float
    edited: float | None
    seq: int


def _object_from_row(r: Sequence[Any]) -> StoredObject:
    """An ``objects`` row (SQLite's columns, or PostgreSQL's in :data:`_PG_OBJECT_COLUMNS`
    order) as a :class:`StoredObject`."""
    return StoredObject(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r[6],
        (r[7], r[8], r[9]),
        (r[10], r[11], r[12], r[13]),
        r[14],
        json.loads(r[15]),
        tuple(json.loads(r[16])),
    )


def _annotation_from_row(r: Sequence[Any]) -> StoredAnnotation:
    """An ``annotations`` row (SQLite's columns, or PostgreSQL's in
    :data:`_PG_ANNOTATION_COLUMNS` order) as a :class:`StoredAnnotation`."""
    return StoredAnnotation(
        r[0],
        r[1],
        r[2],
        r[3],
        tuple(tuple(p) for p in json.loads(r[4])),
        r[5],
        r[6],
        r[7],
        r[8],
        r[9],
        r[10],
        r[11],
        r[12],
    )


def _annotation_values(a: StoredAnnotation) -> tuple[Any, ...]:
    """An annotation's column values, in the table's order (the inverse of
    :func:`_annotation_from_row`)."""
    return (
        a.room,
        a.id,
        a.object_id,
        a.kind,
        json.dumps([list(p) for p in a.points]),
        a.text,
        a.color,
        a.author,
        a.author_subject,
        a.author_id,
        a.created,
        a.edited,
        a.seq,
    )


@dataclass(slots=True)
class RoomRecord:
    """Everything stored about one room, and the counters to continue from."""

    objects: list[StoredObject]
    annotations: list[StoredAnnotation]  # in seq order
    next_object_id: int
    next_annotation_id: int
    seq: int  # the last annotation change's sequence number


@dataclass(slots=True)
class TransformRow:
    room: str
    id: int
    position: Vec3
    rotation: Quat
    scale: float


class ObjectStore(ABC):
    """Storage interface of the objects feature (one implementation per database)."""

    @abstractmethod
    def load_room(self, room: str) -> RoomRecord:
        """The room's objects and annotations (empty for a room never used)."""

    @abstractmethod
    def room_names(self) -> list[str]:
        """Every room with stored objects or annotations."""

    @abstractmethod
    def put_object(self, obj: StoredObject) -> None:
        """Insert or replace an object (spawn, view state change); durable on return."""

    @abstractmethod
    def delete_object(self, room: str, object_id: int, seq: int) -> None:
        """Delete an object and its annotations; durable on return."""

    @abstractmethod
    def put_annotation(self, anno: StoredAnnotation) -> None:
        """Insert or replace an annotation; durable on return."""

    @abstractmethod
    def delete_annotation(self, room: str, annotation_id: int, seq: int) -> None:
        """Delete an annotation; durable on return."""

    @abstractmethod
    def put_transforms(self, rows: Iterable[TransformRow]) -> None:
        """Update the transforms of existing objects in one transaction."""

    @abstractmethod
    def close(self) -> None: ...

    def run_batch(self, calls: list[Callable[[], None]]) -> list[BaseException | None]:
        """Run operations of this store (``put_*`` and ``delete_*`` calls, in order), durable
        when this returns, in as few commits as the backend can; what each ended with (None,
        or the exception that failed it). This default runs them one by one."""
        errors: list[BaseException | None] = []
        for call in calls:
            try:
                call()
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors


_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    asset TEXT NOT NULL,
    name TEXT NOT NULL,
    author TEXT NOT NULL,
    author_subject TEXT NOT NULL,
    created REAL NOT NULL,
    px REAL, py REAL, pz REAL,
    qx REAL, qy REAL, qz REAL, qw REAL,
    scale REAL NOT NULL,
    nodes TEXT NOT NULL,
    plane TEXT NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE TABLE IF NOT EXISTS annotations (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    object_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    points TEXT NOT NULL,
    text TEXT,
    color INTEGER,
    author TEXT NOT NULL,
    author_subject TEXT NOT NULL,
    author_id INTEGER NOT NULL,
    created REAL NOT NULL,
    edited REAL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE INDEX IF NOT EXISTS annotations_by_object ON annotations (room, object_id);
-- Counters survive deletions: ids and sequence numbers are never reused in a room.
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY,
    next_object_id INTEGER NOT NULL DEFAULT 1,
    next_annotation_id INTEGER NOT NULL DEFAULT 1,
    seq INTEGER NOT NULL DEFAULT 0
);
"""


class SQLiteObjectStore(ObjectStore):
    """The embedded default: one SQLite database in the data directory."""

    def __init__(self, data_dir: str | Path) -> None:
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / DB_FILE
        # One connection used from the writer thread; the lock only guards misuse.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # durable at commit, even on power loss
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._batching = False  # inside run_batch's transaction

    def run_batch(self, calls: list[Callable[[], None]]) -> list[BaseException | None]:
        """One transaction (one fsync) for all of them; if it fails, each on its own, so one
        bad operation fails alone."""
        if len(calls) < 2:
            return super().run_batch(calls)
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            self._batching = True
            try:
                for call in calls:
                    call()
                db.execute("COMMIT")
                return [None] * len(calls)
            except Exception:
                db.execute("ROLLBACK")
            finally:
                self._batching = False
        return super().run_batch(calls)

    def _tx(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        with self._lock:
            db = self._db
            if self._batching:  # part of run_batch's transaction
                for sql, args in statements:
                    db.execute(sql, args)
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    db.execute(sql, args)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @staticmethod
    def _counters(room: str, obj: int = 0, anno: int = 0, seq: int = 0) -> list[tuple[str, tuple]]:
        return [
            ("INSERT OR IGNORE INTO rooms (room) VALUES (?)", (room,)),
            (
                "UPDATE rooms SET next_object_id = MAX(next_object_id, ?), "
                "next_annotation_id = MAX(next_annotation_id, ?), seq = MAX(seq, ?) WHERE room = ?",
                (obj, anno, seq, room),
            ),
        ]

    def load_room(self, room: str) -> RoomRecord:
        with self._lock:
            db = self._db
            objs = [
                _object_from_row(r)
                for r in db.execute("SELECT * FROM objects WHERE room = ? ORDER BY id", (room,))
            ]
            annos = [
                _annotation_from_row(r)
                for r in db.execute(
                    "SELECT * FROM annotations WHERE room = ? ORDER BY seq", (room,)
                )
            ]
            row = db.execute(
                "SELECT next_object_id, next_annotation_id, seq FROM rooms WHERE room = ?", (room,)
            ).fetchone()
        nobj, nanno, seq = row if row else (1, 1, 0)
        return RoomRecord(objs, annos, nobj, nanno, seq)  # type: ignore[arg-type]

    def room_names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT room FROM rooms ORDER BY room")]

    def put_object(self, o: StoredObject) -> None:
        self._tx(
            [
                *self._counters(o.room, obj=o.id + 1),
                (
                    "INSERT OR REPLACE INTO objects VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        o.room,
                        o.id,
                        o.asset,
                        o.name,
                        o.author,
                        o.author_subject,
                        o.created,
                        *o.position,
                        *o.rotation,
                        o.scale,
                        json.dumps(o.nodes, separators=(",", ":"), sort_keys=True),
                        json.dumps(list(o.plane)),
                    ),
                ),
            ]
        )

    def delete_object(self, room: str, object_id: int, seq: int) -> None:
        self._tx(
            [
                *self._counters(room, obj=object_id + 1, seq=seq),
                ("DELETE FROM annotations WHERE room = ? AND object_id = ?", (room, object_id)),
                ("DELETE FROM objects WHERE room = ? AND id = ?", (room, object_id)),
            ]
        )

    def put_annotation(self, a: StoredAnnotation) -> None:
        self._tx(
            [
                *self._counters(a.room, anno=a.id + 1, seq=a.seq),
                (
                    "INSERT OR REPLACE INTO annotations VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _annotation_values(a),
                ),
            ]
        )

    def delete_annotation(self, room: str, annotation_id: int, seq: int) -> None:
        self._tx(
            [
                *self._counters(room, anno=annotation_id + 1, seq=seq),
                ("DELETE FROM annotations WHERE room = ? AND id = ?", (room, annotation_id)),
            ]
        )

    def put_transforms(self, rows: Iterable[TransformRow]) -> None:
        batch = [(*r.position, *r.rotation, r.scale, r.room, r.id) for r in rows]
        if not batch:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "UPDATE objects SET px = ?, py = ?, pz = ?, qx = ?, qy = ?, qz = ?, qw = ?, "
                    "scale = ? WHERE room = ? AND id = ?",
                    batch,
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- PostgreSQL


def _pg_counters(first: int) -> str:
    """A CTE raising the room's counters (room ``$1``; next object id, next annotation id and
    sequence number ``$first`` onwards): joined to the operation's own statement, the whole
    change is one statement, one round trip, atomic without a transaction of its own."""
    obj, anno, seq = first, first + 1, first + 2
    return (
        "c AS (INSERT INTO rooms (room, next_object_id, next_annotation_id, seq) "
        f"VALUES ($1, GREATEST(${obj}::bigint, 1), GREATEST(${anno}::bigint, 1), "
        f"GREATEST(${seq}::bigint, 0)) "
        "ON CONFLICT (room) DO UPDATE SET "
        "next_object_id = GREATEST(rooms.next_object_id, EXCLUDED.next_object_id), "
        "next_annotation_id = GREATEST(rooms.next_annotation_id, EXCLUDED.next_annotation_id), "
        "seq = GREATEST(rooms.seq, EXCLUDED.seq))"
    )


_PG_OBJECT_COLUMNS = (
    "room, id, asset, name, author, author_subject, created, px, py, pz, qx, qy, qz, qw, "
    "scale, nodes, plane"
)
_PG_ANNOTATION_COLUMNS = (
    "room, id, object_id, kind, points, text, color, author, author_subject, author_id, "
    "created, edited, seq"
)


def _upsert(table: str, columns: str) -> str:
    names = [c.strip() for c in columns.split(",")]
    values = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    update = ", ".join(f"{c} = EXCLUDED.{c}" for c in names[2:])
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({values}) "
        f"ON CONFLICT (room, id) DO UPDATE SET {update}"
    )


class PostgresObjectStore(ObjectStore):
    """Objects and annotations in PostgreSQL, shared by every server of a cluster: a room
    served by one process today can be opened by another tomorrow (or after a failover) and
    finds everything acknowledged. Each operation is one transaction, committed before the
    method returns (so before the member's acknowledgement); writes are idempotent, so a
    retry after a lost connection is harmless."""

    def __init__(self, db: Any) -> None:
        from .pg import Database

        assert isinstance(db, Database)
        self.db = db
        #: Statements of the operations run_batch is collecting (None: run each at once).
        self._collecting: list[tuple[str, tuple[Any, ...]]] | None = None

    def run_batch(self, calls: list[Callable[[], None]]) -> list[BaseException | None]:
        """One transaction (one round trip of commits) for all of them; if it fails, each on
        its own, so one bad operation fails alone."""
        if len(calls) < 2:
            return super().run_batch(calls)
        self._collecting = []
        try:
            for call in calls:
                call()
            statements = self._collecting
        finally:
            self._collecting = None

        async def tx(conn: Any) -> None:
            for sql, args in statements:
                await conn.execute(sql, *args)

        try:
            self.db.transaction(tx)
            return [None] * len(calls)
        except Exception as exc:
            from .pg import is_transient

            if is_transient(exc):  # the database was out of reach (and retried): all failed
                return [exc] * len(calls)
            return super().run_batch(calls)  # one of them is bad: find which

    def load_room(self, room: str) -> RoomRecord:
        async def load(conn: Any) -> RoomRecord:
            # One snapshot: objects, annotations and counters of the same moment.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                orows = await conn.fetch(
                    f"SELECT {_PG_OBJECT_COLUMNS} FROM objects WHERE room = $1 ORDER BY id", room
                )
                arows = await conn.fetch(
                    f"SELECT {_PG_ANNOTATION_COLUMNS} FROM annotations WHERE room = $1 "
                    "ORDER BY seq",
                    room,
                )
                counters = await conn.fetchrow(
                    "SELECT next_object_id, next_annotation_id, seq FROM rooms WHERE room = $1",
                    room,
                )
            objs = [_object_from_row(r) for r in orows]
            annos = [_annotation_from_row(r) for r in arows]
            nobj, nanno, seq = tuple(counters) if counters else (1, 1, 0)
            return RoomRecord(objs, annos, nobj, nanno, seq)

        return self.db.run(load)  # type: ignore[no-any-return]

    def room_names(self) -> list[str]:
        async def names(conn: Any) -> list[str]:
            return [r[0] for r in await conn.fetch("SELECT room FROM rooms ORDER BY room")]

        return self.db.run(names)  # type: ignore[no-any-return]

    def _op(self, sql: str, args: tuple[Any, ...]) -> None:
        """One change as one statement (committed on return), or into run_batch's
        transaction."""
        if self._collecting is not None:  # run_batch commits it with the others
            self._collecting.append((sql, args))
            return

        async def run(conn: Any) -> None:
            await conn.execute(sql, *args)

        self.db.run(run)

    def put_object(self, o: StoredObject) -> None:
        args = (
            o.room,
            o.id,
            o.asset,
            o.name,
            o.author,
            o.author_subject,
            o.created,
            *map(float, o.position),
            *map(float, o.rotation),
            float(o.scale),
            json.dumps(o.nodes, separators=(",", ":"), sort_keys=True),
            json.dumps(list(o.plane)),
        )
        self._op(
            f"WITH {_pg_counters(18)} {_upsert('objects', _PG_OBJECT_COLUMNS)}",
            (*args, o.id + 1, 0, 0),
        )

    def delete_object(self, room: str, object_id: int, seq: int) -> None:
        self._op(
            f"WITH {_pg_counters(3)}, "
            "a AS (DELETE FROM annotations WHERE room = $1 AND object_id = $2) "
            "DELETE FROM objects WHERE room = $1 AND id = $2",
            (room, object_id, object_id + 1, 0, seq),
        )

    def put_annotation(self, a: StoredAnnotation) -> None:
        args = _annotation_values(a)
        self._op(
            f"WITH {_pg_counters(14)} {_upsert('annotations', _PG_ANNOTATION_COLUMNS)}",
            (*args, 0, a.id + 1, a.seq),
        )

    def delete_annotation(self, room: str, annotation_id: int, seq: int) -> None:
        self._op(
            f"WITH {_pg_counters(3)} DELETE FROM annotations WHERE room = $1 AND id = $2",
            (room, annotation_id, 0, annotation_id + 1, seq),
        )

    def put_transforms(self, rows: Iterable[TransformRow]) -> None:
        batch = [
            (*map(float, r.position), *map(float, r.rotation), float(r.scale), r.room, r.id)
            for r in rows
        ]
        if not batch:
            return

        async def write(conn: Any) -> None:
            await conn.executemany(
                "UPDATE objects SET px = $1, py = $2, pz = $3, qx = $4, qy = $5, qz = $6, "
                "qw = $7, scale = $8 WHERE room = $9 AND id = $10",
                batch,
            )

        self.db.transaction(write)

    def close(self) -> None:
        """Nothing of its own to close: the :class:`~.pg.Database` is the server's."""
