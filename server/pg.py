"""PostgreSQL for durable state shared by several server processes (``--database-url``).

:class:`Database` owns an asyncpg connection pool on an event loop of its own, in a thread of
its own: the stores' blocking methods (called from their writer threads, or from the command
line) hand it a coroutine and wait for the answer, so the server's event loop (ticks, fan-out,
audio) never waits for the database. The schema is created or brought up to date on start
(idempotent, under an advisory lock, so several processes may start at once). A database that
cannot be reached at start is an error naming the URL (without its password); a connection lost
while running is logged and the operation retried for a while (every write is idempotent or
deduplicated, so a retry after a commit whose answer was lost does no harm).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .mediastore import PG_SCHEMA as MEDIA_SCHEMA
from .mediastore import PG_SERIES_PSEUDONYMOUS
from .standing import PG_SCHEMA as STANDING_SCHEMA

log = logging.getLogger("medverse.database")

T = TypeVar("T")

#: Advisory lock keys (arbitrary, fixed): schema changes, and the audit log's head.
SCHEMA_LOCK = 0x6D65_6476_0001
#: Seconds a store operation is retried while the database cannot be reached (then it fails,
#: and the member is told its change was not stored).
RETRY_FOR = 30.0

#: Seconds one statement may take before it is abandoned (and retried).
COMMAND_TIMEOUT = 30.0

#: Schema versions, applied in order, each once (``medverse_schema`` records which).
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE IF NOT EXISTS objects (
    room TEXT NOT NULL,
    id BIGINT NOT NULL,
    asset TEXT NOT NULL,
    name TEXT NOT NULL,
    author TEXT NOT NULL,
    author_subject TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    px DOUBLE PRECISION, py DOUBLE PRECISION, pz DOUBLE PRECISION,
    qx DOUBLE PRECISION, qy DOUBLE PRECISION, qz DOUBLE PRECISION, qw DOUBLE PRECISION,
    scale DOUBLE PRECISION NOT NULL,
    nodes TEXT NOT NULL,
    plane TEXT NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE TABLE IF NOT EXISTS annotations (
    room TEXT NOT NULL,
    id BIGINT NOT NULL,
    object_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    points TEXT NOT NULL,
    text TEXT,
    color BIGINT,
    author TEXT NOT NULL,
    author_subject TEXT NOT NULL,
    author_id BIGINT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    edited DOUBLE PRECISION,
    seq BIGINT NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE INDEX IF NOT EXISTS annotations_by_object ON annotations (room, object_id);
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY,
    next_object_id BIGINT NOT NULL DEFAULT 1,
    next_annotation_id BIGINT NOT NULL DEFAULT 1,
    seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bans (
    id BIGSERIAL PRIMARY KEY,
    room TEXT NOT NULL,
    subject TEXT NOT NULL,
    name TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    until DOUBLE PRECISION,
    lifted DOUBLE PRECISION,
    lifted_by TEXT
);
CREATE INDEX IF NOT EXISTS bans_by_subject ON bans (room, subject);
-- The audit log: one Merkle tree for every server of the cluster. audit_state holds its
-- head (size and the roots of its perfect subtrees); appenders lock that row, so entries
-- get their sequence numbers in one order whatever process appends them.
CREATE TABLE IF NOT EXISTS audit_entries (
    seq BIGINT PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    time DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    room TEXT,
    actor TEXT,
    subject TEXT,
    detail TEXT,
    leaf BYTEA NOT NULL,
    pruned INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS audit_entries_by_time ON audit_entries (time);
CREATE TABLE IF NOT EXISTS audit_tree_heads (
    size BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    root BYTEA NOT NULL,
    signature BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size BIGINT NOT NULL,
    peaks BYTEA NOT NULL,
    public_key BYTEA
);
INSERT INTO audit_state (id, size, peaks) VALUES (1, 0, '') ON CONFLICT (id) DO NOTHING;
""",
    ),
    # Uploaded models' and image series' listings and the image viewers' state
    # (medverse.server.mediastore): a room that moves to another server finds them there.
    (2, MEDIA_SCHEMA),
    (3, PG_SERIES_PSEUDONYMOUS),
    # A room session's removals and standing (medverse.server.standing): they hold on the
    # server a room moves to.
    (4, STANDING_SCHEMA),
]


def redact(url: str) -> str:
    """``url`` without its password (safe to log or print)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_database_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class DatabaseUnavailable(ConnectionError):
    """The database cannot be reached (the message names its URL without the password)."""


def _transient() -> tuple[type[BaseException], ...]:
    """Errors after which an operation is worth retrying: the connection, not the request."""
    import asyncpg

    return (
        OSError,
        asyncio.TimeoutError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError,
        asyncpg.SerializationError,
        asyncpg.DeadlockDetectedError,
    )


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is about reaching the database rather than about the request."""
    return isinstance(exc, (*_transient(), DatabaseUnavailable))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class Database:
    """A PostgreSQL connection pool for blocking callers (see the module docstring)."""

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 4, retry_for: float = RETRY_FOR
    ) -> None:
        if not is_database_url(url):
            raise ValueError(f"database_url {redact(url)!r} is not a postgresql:// URL")
        self.url = url
        self.where = redact(url)
        self.retry_for = retry_for
        self._min, self._max = min_size, max_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: Any = None
        #: Operations run (each :meth:`run` call, retries not counted again): what the tests
        #: and benchmarks count an operation's database round trips with.
        self.calls = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Connect and bring the schema up to date; :class:`DatabaseUnavailable` if the
        database cannot be reached within ``timeout`` seconds."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="medverse-database", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            asyncio.run_coroutine_threadsafe(self._open(timeout), loop).result()
        except Exception as exc:
            self._stop_loop()
            if isinstance(exc, DatabaseUnavailable):
                raise
            raise DatabaseUnavailable(
                f"cannot use the database {self.where}: {_reason(exc)}"
            ) from None

    async def _open(self, timeout: float) -> None:
        import asyncpg

        try:
            self._pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    self.url,
                    min_size=self._min,
                    max_size=self._max,
                    timeout=timeout,
                    # A database that stops answering (rather than refusing) fails the
                    # statement, to be retried, instead of holding a writer forever.
                    command_timeout=COMMAND_TIMEOUT,
                ),
                timeout,
            )
        except (*_transient(), asyncpg.PostgresError) as exc:
            why = "no answer" if isinstance(exc, asyncio.TimeoutError) else _reason(exc)
            raise DatabaseUnavailable(f"cannot reach the database {self.where}: {why}") from None
        async with self._pool.acquire() as conn, conn.transaction():
            # Several servers may start at once: one creates the schema, the others wait.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS medverse_schema (version INTEGER PRIMARY KEY, "
                "applied DOUBLE PRECISION NOT NULL)"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM medverse_schema")}
            for version, sql in MIGRATIONS:
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO medverse_schema (version, applied) VALUES ($1, $2)",
                        version,
                        time.time(),
                    )
                    log.info("database %s: schema version %d created", self.where, version)

    def close(self) -> None:
        """Close the pool and stop its thread (idempotent)."""
        if self._loop is None:
            return
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                asyncio.run_coroutine_threadsafe(
                    asyncio.wait_for(pool.close(), 5.0), self._loop
                ).result()
            except Exception:
                log.warning("database %s: pool closed uncleanly", self.where)
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5.0)
        if loop is not None and not loop.is_running():
            loop.close()

    # ----------------------------------------------------------------- running

    def run(self, fn: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        """``await fn(connection)`` on the pool's loop and return its result, blocking the
        calling thread (never the pool's own). A lost connection is logged and the call made
        again, with a growing pause, for up to ``retry_for`` seconds; then the error is raised
        (at once with ``retry=False``)."""
        loop = self._loop
        if loop is None:
            raise DatabaseUnavailable(f"the database {self.where} is closed")
        transient = _transient()
        self.calls += 1
        deadline = time.monotonic() + self.retry_for
        pause = 0.1
        while True:
            try:
                return asyncio.run_coroutine_threadsafe(self._with(fn), loop).result()
            except transient as exc:
                if not retry or time.monotonic() + pause > deadline or self._loop is None:
                    raise
                log.warning(
                    "database %s: %s; trying again in %.1f s", self.where, _reason(exc), pause
                )
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _with(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable(f"the database {self.where} is closed")
        async with pool.acquire() as conn:
            return await fn(conn)

    def transaction(self, fn: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        """:meth:`run` with ``fn`` inside one transaction."""

        async def tx(conn: Any) -> T:
            async with conn.transaction():
                return await fn(conn)

        return self.run(tx, retry=retry)
