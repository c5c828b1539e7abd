"""PostgreSQL as the durable state (``--database-url``): start-up errors, the schema, and
several servers on one database."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from medverse.server.config import ServerConfig
from medverse.server.pg import Database, DatabaseUnavailable, redact

from .conftest import ROOT, free_port
from .pgservice import new_database


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://app:s3cret@db.example:5433/medverse?sslmode=require") == (
        "postgresql://app:***@db.example:5433/medverse?sslmode=require"
    )
    assert redact("postgresql://app@db/medverse") == "postgresql://app@db/medverse"
    assert redact("postgresql://u:p@[::1]/m") == "postgresql://u:***@[::1]/m"


def test_a_database_url_that_is_not_postgresql_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError) as err:
        ServerConfig(database_url="mysql://root:hunter2@db/x")
    assert "hunter2" not in str(err.value) and "postgresql://" in str(err.value)


def test_serve_exits_with_one_line_naming_an_unreachable_database() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://medverse:hunter2@127.0.0.1:{port}/medverse"
    env = dict(os.environ, MEDVERSE_NO_AUTH="1", MEDVERSE_DATA_DIR=tempfile.mkdtemp())
    serve = ["serve", "--port", str(free_port()), "--database-url", url]
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", *serve],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("medverse serve: error: cannot reach the database"), out.stderr
    assert f"postgresql://medverse:***@127.0.0.1:{port}/medverse" in last
    assert "hunter2" not in out.stderr + out.stdout


def test_schema_creation_is_idempotent_and_safe_from_several_processes(
    postgres_server: str,
) -> None:
    url = new_database(postgres_server)
    code = (
        "import sys; from medverse.server.pg import Database; "
        "d = Database(sys.argv[1]); d.start(); d.close()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], cwd=ROOT, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    db = Database(url)
    db.start()  # once more, on a database that has it all

    async def versions(conn: object) -> list[int]:
        return [r[0] for r in await conn.fetch("SELECT version FROM medverse_schema")]  # type: ignore[attr-defined]

    try:
        assert db.run(versions) == [1]
    finally:
        db.close()


def test_a_closed_database_says_so() -> None:
    db = Database("postgresql://u:p@127.0.0.1:1/x")
    with pytest.raises(DatabaseUnavailable, match=r"u:\*\*\*@"):
        db.run(lambda conn: conn.fetch("SELECT 1"))
