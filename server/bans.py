"""Bans: identities a host barred from a room name, for a chosen time or until lifted.

A ban names a token subject and a room name, not a session: it holds whenever that room is
open again, across restarts, until it expires or a host lifts it. Bans are few and rare, so
each is committed (SQLite, WAL, ``synchronous=FULL``; or PostgreSQL) before the host's action
is acknowledged; the audit log records who banned or lifted whom, and the store answers who is
barred now.

:class:`BanBackend` is the interface; :class:`BanStore` keeps them in the data directory's SQLite
file, :class:`PostgresBanStore` in the PostgreSQL database a cluster shares. The question
asked at every join ("is this identity barred?") never waits for a database: the PostgreSQL
store answers from a copy of the bans in force, refreshed every second from the database (so
a ban made on one server holds on the others within a second, and at once on the server that
made it).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medverse.protocol.errors import ErrorCode, ProtocolError

log = logging.getLogger("medverse.bans")

DB_FILE = "bans.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    room TEXT NOT NULL,
    subject TEXT NOT NULL,
    name TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created REAL NOT NULL,
    until REAL,
    lifted REAL,
    lifted_by TEXT
);
CREATE INDEX IF NOT EXISTS bans_by_subject ON bans (room, subject);
"""


@dataclass(frozen=True, slots=True)
class Ban:
    """One ban: ``subject`` (shown to hosts as ``name``) may not enter ``room`` until
    ``until`` (Unix seconds; None: until a host lifts it)."""

    id: int
    room: str
    subject: str
    name: str
    reason: str
    actor: str
    created: float
    until: float | None

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now


class BanBackend(ABC):
    """Where bans are kept (one implementation per database)."""

    @abstractmethod
    def add(
        self, room: str, subject: str, name: str, reason: str, actor: str, until: float | None
    ) -> Ban:
        """Record a ban; durable on return."""

    @abstractmethod
    def lift(self, room: str, ban_id: int, actor: str) -> Ban | None:
        """Lift ban ``ban_id`` of ``room`` if it is still in force; the lifted ban, or None."""

    @abstractmethod
    def active(self, room: str, subject: str | None = None) -> list[Ban]:
        """The bans of ``room`` in force now (of one ``subject``, if given), oldest first."""

    @abstractmethod
    def close(self) -> None: ...


def open_db(path: str | Path, schema: str) -> sqlite3.Connection:
    """The data directory's moderation file (``path`` ``:memory:``: the process's only),
    with ``schema``: autocommit, WAL, and every commit on disk before a host is answered."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


class BanStore(BanBackend):
    """Bans in one SQLite file (``path`` ``:memory:`` keeps them for the process only)."""

    def __init__(self, path: str | Path) -> None:
        self._db = open_db(path, _SCHEMA)
        self._lock = threading.Lock()

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> BanStore:
        return cls(Path(data_dir) / DB_FILE)

    def add(
        self, room: str, subject: str, name: str, reason: str, actor: str, until: float | None
    ) -> Ban:
        """Record a ban; durable on return."""
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO bans (room, subject, name, reason, actor, created, until) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (room, subject, name, reason, actor, now, until),
            )
            ban_id = cur.lastrowid
        assert ban_id is not None
        return Ban(ban_id, room, subject, name, reason, actor, now, until)

    def lift(self, room: str, ban_id: int, actor: str) -> Ban | None:
        """Lift ban ``ban_id`` of ``room`` if it is still in force; the lifted ban, or None."""
        ban = next((b for b in self.active(room) if b.id == ban_id), None)
        if ban is None:
            return None
        with self._lock:
            self._db.execute(
                "UPDATE bans SET lifted = ?, lifted_by = ? WHERE id = ?",
                (time.time(), actor, ban_id),
            )
        return ban

    def active(self, room: str, subject: str | None = None) -> list[Ban]:
        """The bans of ``room`` in force now (of one ``subject``, if given), oldest first."""
        sql = "SELECT id, room, subject, name, reason, actor, created, until FROM bans "
        sql += "WHERE room = ? AND lifted IS NULL AND (until IS NULL OR until > ?)"
        args: tuple[object, ...] = (room, time.time())
        if subject is not None:
            sql += " AND subject = ?"
            args += (subject,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [Ban(*r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


#: Seconds between two reads of the bans in force from PostgreSQL (bans made on another
#: server hold here after this long at most).
REFRESH_INTERVAL = 1.0

_PG_COLUMNS = "id, room, subject, name, reason, actor, created, until"


class PostgresBanStore(BanBackend):
    """Bans in the PostgreSQL database every server of a cluster shares.

    :meth:`add` and :meth:`lift` commit before they return (one round trip, made only by a
    host's action, never retried for long: a host whose ban cannot be stored is told so);
    :meth:`active` answers from the copy of the bans in force, which a thread of its own
    reads again every :data:`REFRESH_INTERVAL` seconds."""

    def __init__(self, db: Any, refresh: float = REFRESH_INTERVAL) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._bans: dict[int, Ban] = {}
        self._writes = 0  # this server's own changes so far (see _refresh)
        self._stop = threading.Event()
        self._bans = self._read()  # the first read at start: a failure is the start's
        self._thread = threading.Thread(
            target=self._refresh, args=(refresh,), name="medverse-bans", daemon=True
        )
        self._thread.start()

    def _read(self) -> dict[int, Ban]:
        async def read(conn: Any) -> list[Any]:
            return list(
                await conn.fetch(
                    f"SELECT {_PG_COLUMNS} FROM bans WHERE lifted IS NULL "
                    "AND (until IS NULL OR until > $1) ORDER BY id",
                    time.time(),
                )
            )

        return {r[0]: Ban(*r) for r in self.db.run(read, retry=False)}

    def _refresh(self, interval: float) -> None:
        failing = False
        while not self._stop.wait(interval):
            writes = self._writes
            try:
                bans = self._read()
            except Exception as exc:
                if not failing:  # once per outage, not every second
                    log.warning("bans could not be read again (%s); the last copy holds", exc)
                failing = True
                continue
            if failing:
                log.warning("bans are read from the database again")
            failing = False
            with self._lock:
                # A read that may predate a change made here meanwhile would undo it for a
                # moment: it is dropped, the next one has it.
                if self._writes == writes:
                    self._bans = bans

    def add(
        self, room: str, subject: str, name: str, reason: str, actor: str, until: float | None
    ) -> Ban:
        now = time.time()

        async def insert(conn: Any) -> int:
            return int(
                await conn.fetchval(
                    "INSERT INTO bans (room, subject, name, reason, actor, created, until) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    room,
                    subject,
                    name,
                    reason,
                    actor,
                    now,
                    until,
                )
            )

        ban_id = self._write(insert, "ban")
        ban = Ban(ban_id, room, subject, name, reason, actor, now, until)
        with self._lock:
            self._bans = {**self._bans, ban.id: ban}
            self._writes += 1
        return ban

    def lift(self, room: str, ban_id: int, actor: str) -> Ban | None:
        async def update(conn: Any) -> Any:
            return await conn.fetchrow(
                f"UPDATE bans SET lifted = $1, lifted_by = $2 WHERE id = $3 AND room = $4 "
                f"AND lifted IS NULL AND (until IS NULL OR until > $1) RETURNING {_PG_COLUMNS}",
                time.time(),
                actor,
                ban_id,
                room,
            )

        row = self._write(update, "unban")
        if row is None:
            return None  # no such ban in force in this room
        with self._lock:
            self._bans = {k: v for k, v in self._bans.items() if k != ban_id}
            self._writes += 1
        return Ban(*row)

    def _write(self, fn: Any, what: str) -> Any:
        """One write, at once; a database out of reach is the host's typed error."""
        try:
            return self.db.run(fn, retry=False)
        except Exception as exc:
            log.error("a %s could not be stored: %s", what, exc)
            raise ProtocolError(
                ErrorCode.INTERNAL, f"the {what} could not be stored now; try again"
            ) from None

    def active(self, room: str, subject: str | None = None) -> list[Ban]:
        now = time.time()
        with self._lock:
            bans = self._bans
        return [
            b
            for b in bans.values()
            if b.room == room and b.active(now) and (subject is None or b.subject == subject)
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
