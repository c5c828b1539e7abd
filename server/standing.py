"""What a room's session holds against (or for) identities, stored so it survives a move.

A host's ``remove`` refuses the member's token for the rest of the session, and a server mute
or a role or grant change holds for the identity for the rest of the session (see
:mod:`.moderation`). The room keeps them in memory; this store keeps a copy, next to the bans
(the data directory's ``bans.sqlite3``, or the PostgreSQL database a cluster shares), so that
a room that moves to another server (a drain, or its server killed) or whose server restarts
within the session comes back with them.

Rows are keyed by room name and *session*: a random id a room takes when it opens with no
session of its own in the store. A session lasts while its room runs somewhere: the server
that runs a room with moderation state marks its session alive every :data:`TOUCH_INTERVAL`
seconds, and a server that opens the room continues the session if it was marked alive
recently enough (within the time its members may take to come back: the resume grace, the
room's linger time and a margin); otherwise the room starts a new, clean session and the old
one's rows are deleted. A room that closes because it stayed empty ends its session (its rows
are deleted), as before: removals and standing end with the session; bans outlive it.

Writes are few (a host's action) and each is committed before the host is answered; a room
with no moderation state writes nothing, not even the session's mark.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medverse.protocol.errors import ErrorCode, ProtocolError

from .bans import DB_FILE, open_db

log = logging.getLogger("medverse.standing")

#: Seconds between two marks of a session alive, while its room holds moderation state.
TOUCH_INTERVAL = 5.0

#: A write marks its session alive. It never takes the room over from another session (a
#: late write of a session that has ended must not bring it back); its rows then belong to
#: no session and go with the next purge.
_MARK = (
    "INSERT INTO moderation_sessions (room, session, touched) VALUES ($1, $2, $3) "
    "ON CONFLICT (room) DO UPDATE SET touched = excluded.touched "
    "WHERE moderation_sessions.session = excluded.session"
)


def _sqlite(sql: str) -> str:
    """PostgreSQL's numbered parameters as SQLite's ``?`` (every one used once, in order)."""
    return re.sub(r"\$\d+", "?", sql)


_MARK_SQLITE = _sqlite(_MARK)

#: The reason a token was removed from a room's live session.
_REMOVAL = (
    "SELECT r.reason FROM moderation_removals r JOIN moderation_sessions s "
    "ON s.room = r.room AND s.session = r.session "
    "WHERE s.room = $1 AND s.touched >= $2 AND r.token_id = $3"
)
_REMOVAL_SQLITE = _sqlite(_REMOVAL)

#: Rows of ``table`` whose session is not the room's session any more.
_ORPHANS = (
    "DELETE FROM {table} WHERE NOT EXISTS (SELECT 1 FROM moderation_sessions s "
    "WHERE s.room = {table}.room AND s.session = {table}.session)"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS moderation_sessions (
    room TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    touched REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS moderation_removals (
    room TEXT NOT NULL,
    session TEXT NOT NULL,
    token_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (room, session, token_id)
);
CREATE TABLE IF NOT EXISTS moderation_standing (
    room TEXT NOT NULL,
    session TEXT NOT NULL,
    subject TEXT NOT NULL,
    muted INTEGER NOT NULL,
    role TEXT,
    grants TEXT,
    PRIMARY KEY (room, session, subject)
);
"""

#: The same tables in PostgreSQL (a migration of :mod:`.pg`).
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS moderation_sessions (
    room TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    touched DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS moderation_removals (
    room TEXT NOT NULL,
    session TEXT NOT NULL,
    token_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (room, session, token_id)
);
CREATE TABLE IF NOT EXISTS moderation_standing (
    room TEXT NOT NULL,
    session TEXT NOT NULL,
    subject TEXT NOT NULL,
    muted BOOLEAN NOT NULL,
    role TEXT,
    grants TEXT,
    PRIMARY KEY (room, session, subject)
);
"""


@dataclass(frozen=True, slots=True)
class Standing:
    """One identity's standing in a session: a server mute, and the role and grants a host
    gave it (None: as its token says)."""

    muted: bool = False
    role: tuple[str, frozenset[str]] | None = None


@dataclass
class SessionState:
    """A room session's stored moderation state."""

    session: str
    #: Token id -> the reason it was removed.
    removed: dict[str, str] = field(default_factory=dict)
    #: Token subject -> its standing.
    standing: dict[str, Standing] = field(default_factory=dict)


def _grants_text(standing: Standing) -> tuple[str | None, str | None]:
    if standing.role is None:
        return None, None
    role, grants = standing.role
    return role, " ".join(sorted(grants))


def _standing(muted: Any, role: str | None, grants: str | None) -> Standing:
    if role is None:
        return Standing(bool(muted))
    return Standing(bool(muted), (role, frozenset(grants.split()) if grants else frozenset()))


class StandingBackend(ABC):
    """Where rooms' removals and standing are kept (one implementation per database)."""

    #: Whether reads answer at once (a local file): the room reads on the event loop, as the
    #: bans are read; else in a thread, and joins wait for it.
    local = False

    @abstractmethod
    def load(self, room: str, alive_since: float) -> SessionState | None:
        """The session of ``room`` marked alive at or after ``alive_since`` (Unix seconds),
        with its removals and standing; None if there is none (an older one is deleted)."""

    @abstractmethod
    def removal(self, room: str, token_id: str, alive_since: float) -> str | None:
        """The reason ``token_id`` was removed from the session of ``room`` marked alive at
        or after ``alive_since``; None if it was not (or the session is over). Reads only."""

    @abstractmethod
    def remove(self, room: str, session: str, token_id: str, reason: str) -> None:
        """Record that ``token_id`` was removed from the session; durable on return."""

    @abstractmethod
    def set_standing(self, room: str, session: str, subject: str, standing: Standing) -> None:
        """Record ``subject``'s standing in the session; durable on return."""

    @abstractmethod
    def touch(self, room: str, session: str) -> None:
        """Mark the session of ``room`` alive now."""

    @abstractmethod
    def end(self, room: str, session: str) -> None:
        """The session is over (its room closed): delete its rows."""

    @abstractmethod
    def close(self) -> None: ...


class SQLiteStandingStore(StandingBackend):
    """Removals and standing in an SQLite file (the bans' file, ``bans.sqlite3``; ``path``
    ``:memory:`` keeps them for the process only)."""

    local = True

    def __init__(self, path: str | Path) -> None:
        self._db = open_db(path, _SCHEMA)
        self._lock = threading.Lock()

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> SQLiteStandingStore:
        return cls(Path(data_dir) / DB_FILE)

    def load(self, room: str, alive_since: float) -> SessionState | None:
        with self._lock:
            self._purge(alive_since)
            row = self._db.execute(
                "SELECT session, touched FROM moderation_sessions WHERE room = ?", (room,)
            ).fetchone()
            if row is None:
                return None
            session, touched = row
            if touched < alive_since:
                self._delete(room)
                return None
            removed = self._db.execute(
                "SELECT token_id, reason FROM moderation_removals WHERE room = ? AND session = ?",
                (room, session),
            ).fetchall()
            standing = self._db.execute(
                "SELECT subject, muted, role, grants FROM moderation_standing "
                "WHERE room = ? AND session = ?",
                (room, session),
            ).fetchall()
        return SessionState(
            session,
            {t: r for t, r in removed},
            {s: _standing(m, role, g) for s, m, role, g in standing},
        )

    def removal(self, room: str, token_id: str, alive_since: float) -> str | None:
        with self._lock:
            row = self._db.execute(_REMOVAL_SQLITE, (room, alive_since, token_id)).fetchone()
        return None if row is None else str(row[0])

    def _tx(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run ``statements`` as one transaction (under the lock). On an error it is rolled
        back: a connection left inside a failed transaction would refuse every later write
        and hold the file's write lock against the bans."""
        self._db.execute("BEGIN")
        try:
            for sql, args in statements:
                self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _delete(self, room: str) -> None:
        """Delete every row of ``room`` (under the lock)."""
        self._tx(
            *(
                (f"DELETE FROM {table} WHERE room = ?", (room,))
                for table in ("moderation_sessions", "moderation_removals", "moderation_standing")
            )
        )

    def _purge(self, alive_since: float) -> None:
        """Delete every room's session last marked before ``alive_since`` and rows no
        session owns (a server that was killed, or rooms never opened again), under the
        lock: what nobody can continue is not kept."""
        self._tx(
            ("DELETE FROM moderation_sessions WHERE touched < ?", (alive_since,)),
            *(
                (_ORPHANS.format(table=t), ())
                for t in ("moderation_removals", "moderation_standing")
            ),
        )

    @staticmethod
    def _mark(room: str, session: str) -> tuple[str, tuple[Any, ...]]:
        return _MARK_SQLITE, (room, session, time.time())

    def remove(self, room: str, session: str, token_id: str, reason: str) -> None:
        with self._lock:
            self._tx(
                self._mark(room, session),
                (
                    "INSERT OR REPLACE INTO moderation_removals (room, session, token_id, "
                    "reason) VALUES (?, ?, ?, ?)",
                    (room, session, token_id, reason),
                ),
            )

    def set_standing(self, room: str, session: str, subject: str, standing: Standing) -> None:
        role, grants = _grants_text(standing)
        with self._lock:
            self._tx(
                self._mark(room, session),
                (
                    "INSERT OR REPLACE INTO moderation_standing "
                    "(room, session, subject, muted, role, grants) VALUES (?, ?, ?, ?, ?, ?)",
                    (room, session, subject, int(standing.muted), role, grants),
                ),
            )

    def touch(self, room: str, session: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE moderation_sessions SET touched = ? WHERE room = ? AND session = ?",
                (time.time(), room, session),
            )

    def end(self, room: str, session: str) -> None:
        with self._lock:
            row = self._db.execute(
                "SELECT session FROM moderation_sessions WHERE room = ?", (room,)
            ).fetchone()
            if row is not None and row[0] == session:
                self._delete(room)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStandingStore(StandingBackend):
    """Removals and standing in the PostgreSQL database every server of a cluster shares.

    Each call is one round trip (retried while the database is out of reach, see
    :meth:`medverse.server.pg.Database.run`; every write is idempotent)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def load(self, room: str, alive_since: float) -> SessionState | None:
        async def read(conn: Any) -> SessionState | None:
            await _pg_purge(conn, alive_since)
            row = await conn.fetchrow(
                "SELECT session, touched FROM moderation_sessions WHERE room = $1", room
            )
            if row is None:
                return None
            session, touched = row[0], row[1]
            if touched < alive_since:
                await _pg_delete(conn, room, session)
                return None
            removed = await conn.fetch(
                "SELECT token_id, reason FROM moderation_removals WHERE room = $1 AND session = $2",
                room,
                session,
            )
            standing = await conn.fetch(
                "SELECT subject, muted, role, grants FROM moderation_standing "
                "WHERE room = $1 AND session = $2",
                room,
                session,
            )
            return SessionState(
                session,
                {r[0]: r[1] for r in removed},
                {r[0]: _standing(r[1], r[2], r[3]) for r in standing},
            )

        result: SessionState | None = self.db.transaction(read)
        return result

    def removal(self, room: str, token_id: str, alive_since: float) -> str | None:
        async def read(conn: Any) -> str | None:
            reason = await conn.fetchval(_REMOVAL, room, alive_since, token_id)
            return None if reason is None else str(reason)

        result: str | None = self.db.run(read)
        return result

    def remove(self, room: str, session: str, token_id: str, reason: str) -> None:
        async def write(conn: Any) -> None:
            await _pg_mark(conn, room, session)
            await conn.execute(
                "INSERT INTO moderation_removals (room, session, token_id, reason) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (room, session, token_id) "
                "DO UPDATE SET reason = excluded.reason",
                room,
                session,
                token_id,
                reason,
            )

        self._write(write, "removal")

    def set_standing(self, room: str, session: str, subject: str, standing: Standing) -> None:
        role, grants = _grants_text(standing)

        async def write(conn: Any) -> None:
            await _pg_mark(conn, room, session)
            await conn.execute(
                "INSERT INTO moderation_standing (room, session, subject, muted, role, grants) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room, session, subject) "
                "DO UPDATE SET muted = excluded.muted, role = excluded.role, "
                "grants = excluded.grants",
                room,
                session,
                subject,
                standing.muted,
                role,
                grants,
            )

        self._write(write, "mute or grant change")

    def touch(self, room: str, session: str) -> None:
        async def write(conn: Any) -> None:
            await conn.execute(
                "UPDATE moderation_sessions SET touched = $1 WHERE room = $2 AND session = $3",
                time.time(),
                room,
                session,
            )

        self.db.run(write, retry=False)

    def end(self, room: str, session: str) -> None:
        async def write(conn: Any) -> None:
            await _pg_delete(conn, room, session)

        self.db.transaction(write)

    def _write(self, fn: Any, what: str) -> None:
        """One write, at once (as a ban is); a database out of reach is the host's typed
        error."""
        try:
            self.db.transaction(fn, retry=False)
        except Exception as exc:
            log.error("a %s could not be stored: %s", what, exc)
            raise ProtocolError(
                ErrorCode.INTERNAL, f"the {what} could not be stored now; try again"
            ) from None

    def close(self) -> None:
        pass  # the database is the server's


async def _pg_mark(conn: Any, room: str, session: str) -> None:
    await conn.execute(_MARK, room, session, time.time())


async def _pg_purge(conn: Any, alive_since: float) -> None:
    """Every room's session last marked before ``alive_since``, and rows no session owns."""
    await conn.execute("DELETE FROM moderation_sessions WHERE touched < $1", alive_since)
    for table in ("moderation_removals", "moderation_standing"):
        await conn.execute(_ORPHANS.format(table=table))


async def _pg_delete(conn: Any, room: str, session: str) -> None:
    """Delete ``session`` of ``room`` (if it is still the room's session) and its rows."""
    deleted = await conn.fetchval(
        "DELETE FROM moderation_sessions WHERE room = $1 AND session = $2 RETURNING 1",
        room,
        session,
    )
    if deleted is None:
        return
    await conn.execute(
        "DELETE FROM moderation_removals WHERE room = $1 AND session = $2", room, session
    )
    await conn.execute(
        "DELETE FROM moderation_standing WHERE room = $1 AND session = $2", room, session
    )
