"""The durable-state backends every store test runs against: SQLite files in the data
directory (the embedded default) and PostgreSQL (a fresh database per test on the session's
private server, see :mod:`tests.pgservice`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each durable-state backend in turn (PostgreSQL: a fresh database for the test)."""
    if request.param == "sqlite":
        return Backend("sqlite")
    url = request.getfixturevalue("postgres_server")
    return Backend("postgresql", new_database(url))
