"""Bans: identities a host barred from a room name, for a chosen time or until lifted.

A ban names a token subject and a room name, not a session: it holds whenever that room is
open again, across restarts, until it expires or a host lifts it. Bans are few and rare, so
each is committed (SQLite, WAL, ``synchronous=FULL``) before the host's action is
acknowledged; the audit log records who banned or lifted whom, and the store answers who is
barred now.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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


class BanStore:
    """Bans in one SQLite file (``path`` ``:memory:`` keeps them for the process only)."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # on disk before the host is answered
        self._db.executescript(_SCHEMA)
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
