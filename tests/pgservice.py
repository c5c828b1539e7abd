"""A private PostgreSQL server for the tests and benchmarks: ``initdb`` in a temporary folder,
listening on a free port of 127.0.0.1 only (and a socket in that folder), stopped and removed
afterwards. Never a system service.

PostgreSQL refuses to run as root: as root the cluster is owned by, and run as, the
``postgres`` user (Debian's package creates it; ``.ci/run`` makes sure it exists). Debian keeps
the programs in ``/usr/lib/postgresql/NN/bin``, not on PATH, so they are looked for there too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from benchmarks.harness import free_port

USER = "medverse"
PASSWORD = "medverse-test-password"


def bin_dir() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl``, or None if PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """One running PostgreSQL cluster: :attr:`url` reaches its ``postgres`` database as a
    superuser with a password; :meth:`create_database` gives each test a fresh one."""

    def __init__(self, *, fsync: bool = False) -> None:
        bindir = bin_dir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (initdb not found)")
        self.bindir = bindir
        self.port = free_port()
        # As root the folder is handed to the postgres user, who must reach it: /tmp, not a
        # TMPDIR that may be private to root.
        parent = "/tmp" if os.geteuid() == 0 and os.path.isdir("/tmp") else None
        self.root = Path(tempfile.mkdtemp(prefix="medverse-pg-", dir=parent))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            # postgres will not run as root: the cluster belongs to an unprivileged user.
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-locale",
        )
        pwfile.unlink()
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.root}",
            "-c max_connections=200",
            f"-c fsync={'on' if fsync else 'off'}",
            "-c shared_buffers=32MB",
        ]
        self._options = " ".join(options)
        self.start()
        self.url = self.url_for("postgres")

    def start(self) -> None:
        """Start the server (again, after :meth:`halt`)."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o", self._options,
            "start",
        )  # fmt: skip

    def halt(self) -> None:
        """Stop the server, keeping its data (the database goes away for a while)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _processes(self) -> list[psutil.Process]:
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        return [main, *main.children(recursive=True)]

    def freeze(self) -> None:
        """Stop every process of the server (SIGSTOP): the database hangs without refusing
        anything, as one that stops answering does (a network partition, a stalled disk)."""
        for proc in self._processes():
            proc.suspend()

    def thaw(self) -> None:
        """Let a frozen server carry on (SIGCONT)."""
        for proc in self._processes():
            proc.resume()

    def _run(self, program: str, *args: str) -> None:
        cmd = [*self._as, str(self.bindir / program), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stdout}{done.stderr}{log}")

    def url_for(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        import asyncio

        import asyncpg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"

        async def create() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        # In a thread of its own: the caller may be running an event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, create()).result()
        return self.url_for(name)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(*, fsync: bool = False) -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the length of the block."""
    server = PostgresServer(fsync=fsync)
    try:
        yield server
    finally:
        server.stop()


_SERVER: PostgresServer | None = None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a private PostgreSQL server for this test session (started on first use,
    stopped at the end). Skipped where PostgreSQL is not installed (``.ci/run`` installs it)."""
    global _SERVER
    if bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    t0 = time.monotonic()
    with running_postgres() as server:
        _SERVER = server
        print(f"postgres up in {time.monotonic() - t0:.1f} s on port {server.port}")
        try:
            yield server.url
        finally:
            _SERVER = None


def new_database(url: str) -> str:
    """A fresh database on the session's server (``url`` from :func:`postgres_server`)."""
    assert _SERVER is not None and _SERVER.url == url
    return _SERVER.create_database()
