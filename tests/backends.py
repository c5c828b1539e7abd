"""The durable-state backends every store test runs against: SQLite files in the data
directory (the embedded default) and PostgreSQL (a fresh database per test on the session's
private server, see :mod:`tests.pgservice`)."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medverse.server.assets import AssetStore
from medverse.server.audit import (
    DB_FILE,
    AuditLog,
    AuditSource,
    PostgresAuditLog,
    PostgresAuditSource,
    SQLiteAuditSource,
)
from medverse.server.bans import BanBackend, BanStore, PostgresBanStore
from medverse.server.imaging import ImageStore
from medverse.server.mediastore import PostgresAssetIndex, PostgresSeriesIndex
from medverse.server.standing import (
    PostgresStandingStore,
    SQLiteStandingStore,
    StandingBackend,
)
from medverse.server.store import ObjectStore, PostgresObjectStore, SQLiteObjectStore

from .pgservice import new_database

BACKENDS = ["sqlite", "postgresql"]


@dataclass(frozen=True)
class Backend:
    """Where a test's servers keep their durable state."""

    name: str
    #: The PostgreSQL database of this test (None for SQLite).
    database_url: str | None = None

    def settings(self) -> dict[str, object]:
        """``run_server`` settings that select this backend."""
        return {"database_url": self.database_url} if self.database_url else {}

    @contextlib.contextmanager
    def object_store(self, data_dir: str | Path) -> Iterator[ObjectStore]:
        """The object store a server with :meth:`settings` and ``data_dir`` uses."""
        if self.database_url is None:
            store: ObjectStore = SQLiteObjectStore(data_dir)
            try:
                yield store
            finally:
                store.close()
            return
        from medverse.server.pg import Database

        db = Database(self.database_url)
        db.start()
        try:
            yield PostgresObjectStore(db)
        finally:
            db.close()

    @contextlib.contextmanager
    def database(self) -> Iterator[Any]:
        """A started :class:`~medverse.server.pg.Database` (None for SQLite)."""
        if self.database_url is None:
            yield None
            return
        from medverse.server.pg import Database

        db = Database(self.database_url)
        db.start()
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def media_stores(
        self, data_dir: str | Path, blob_dir: str | Path | None = None
    ) -> Iterator[tuple[AssetStore, ImageStore, Any]]:
        """The model and image stores a server with :meth:`settings`, ``data_dir`` and
        ``blob_dir`` uses, and its :class:`~medverse.server.pg.Database` (None for SQLite),
        closed at the end."""
        with self.database() as db:
            if db is None:
                assets = AssetStore(data_dir, blob_dir=blob_dir)
                images = ImageStore(data_dir, blob_dir=blob_dir)
            else:
                assets = AssetStore(data_dir, blob_dir=blob_dir, index=PostgresAssetIndex(db))
                images = ImageStore(data_dir, blob_dir=blob_dir, index=PostgresSeriesIndex(db))
            try:
                yield assets, images, db
            finally:
                assets.close()
                images.close()

    @contextlib.contextmanager
    def ban_store(self, data_dir: str | Path, refresh: float = 1.0) -> Iterator[BanBackend]:
        """The bans a server with :meth:`settings` and ``data_dir`` keeps."""
        with self.database() as db:
            store = BanStore.in_dir(data_dir) if db is None else PostgresBanStore(db, refresh)
            try:
                yield store
            finally:
                store.close()

    @contextlib.contextmanager
    def standing_store(self, data_dir: str | Path) -> Iterator[StandingBackend]:
        """The removals and standing a server with :meth:`settings` and ``data_dir`` keeps."""
        with self.database() as db:
            store: StandingBackend = (
                SQLiteStandingStore.in_dir(data_dir) if db is None else PostgresStandingStore(db)
            )
            try:
                yield store
            finally:
                store.close()

    @contextlib.contextmanager
    def audit_log(
        self, data_dir: str | Path, **options: Any
    ) -> Iterator[AuditLog | PostgresAuditLog]:
        """The audit log a server with :meth:`settings` and ``data_dir`` appends to (closed,
        with its last head signed, at the end)."""
        with self.database() as db:
            log: AuditLog | PostgresAuditLog = (
                AuditLog(data_dir, **options)
                if db is None
                else PostgresAuditLog(db, data_dir, **options)
            )
            try:
                yield log
            finally:
                log.close()

    @contextlib.contextmanager
    def audit_source(self, data_dir: str | Path) -> Iterator[AuditSource]:
        """The audit log to read (a fresh snapshot)."""
        with self.database() as db:
            src = SQLiteAuditSource(data_dir) if db is None else PostgresAuditSource(db, data_dir)
            try:
                yield src
            finally:
                src.close()

    def audit_args(self) -> list[str]:
        """``medverse audit`` arguments that select this backend's log."""
        return ["--database-url", self.database_url] if self.database_url else []

    def execute(self, data_dir: str | Path, sql: str, *args: object) -> None:
        """Change the stored audit log behind the server's back (tampering): ``sql`` names
        the tables ``{entries}`` and ``{heads}`` and takes ``?`` parameters."""
        if self.database_url is None:
            db = sqlite3.connect(Path(data_dir) / DB_FILE)
            db.execute(sql.format(entries="entries", heads="tree_heads"), args)
            db.commit()
            db.close()
            return
        count = iter(range(1, 100))
        text = re.sub(r"\?", lambda _: f"${next(count)}", sql)
        text = text.format(entries="audit_entries", heads="audit_tree_heads")

        async def run(conn: Any) -> None:
            await conn.execute(text, *args)

        with self.database() as pg:
            pg.run(run)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each durable-state backend in turn (PostgreSQL: a fresh database for the test)."""
    if request.param == "sqlite":
        return Backend("sqlite")
    url = request.getfixturevalue("postgres_server")
    return Backend("postgresql", new_database(url))
