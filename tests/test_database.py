"""PostgreSQL as the durable state (``--database-url``): start-up errors, the schema, and
several servers on one database."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest

from medverse.client_sdk import connect
from medverse.server.audit import PostgresAuditLog, verify
from medverse.server.config import ServerConfig
from medverse.server.pg import MIGRATIONS, Database, DatabaseUnavailable, redact

from .backends import Backend
from .conftest import ROOT, ServerProcess, free_port, run_server
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
        assert sorted(db.run(versions)) == [v for v, _ in MIGRATIONS]  # each once
    finally:
        db.close()


def test_a_closed_database_says_so() -> None:
    db = Database("postgresql://u:p@127.0.0.1:1/x")
    with pytest.raises(DatabaseUnavailable, match=r"u:\*\*\*@"):
        db.run(lambda conn: conn.fetch("SELECT 1"))


# --------------------------------------------------------------------------- the audit log

APPENDER = """
import os, sys, time
from medverse.server.audit import PostgresAuditLog
from medverse.server.pg import Database
url, data, name, count, gate = sys.argv[1:]
db = Database(url)
db.start()
log = PostgresAuditLog(db, data, sign_delay=0.05)
open(os.path.join(gate, "ready-" + name), "w").close()
while not os.path.exists(os.path.join(gate, "go")):  # both begin together
    time.sleep(0.005)
for i in range(int(count)):
    log.append("join", room=name, actor=f"{name}-{i}")
    if i % 5 == 4:
        log.flush()  # many small transactions: the other process's come in between
        time.sleep(0.002)
log.close()
db.close()
"""


def test_two_processes_append_to_one_log_in_one_order(postgres_server: str) -> None:
    url = new_database(postgres_server)
    data = tempfile.mkdtemp(prefix="medverse-audit-")  # shared: one signing key
    gate = tempfile.mkdtemp(prefix="medverse-gate-")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, url, data, name, "300", gate],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 90
    while not all(os.path.exists(os.path.join(gate, f"ready-{n}")) for n in "ab"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    open(os.path.join(gate, "go"), "w").close()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    backend = Backend("postgresql", url)
    with backend.audit_source(data) as src:
        report = verify(src)
        rows = src.rows()
        heads = src.heads()
    assert report.ok and report.entries == 600, report.problems
    assert [r[1] for r in rows] == list(range(1, 601))  # no gap, no duplicate
    for name in ("a", "b"):  # each process's entries in the order it appended them
        actors = [r[5] for r in rows if r[4] == name]
        assert actors == [f"{name}-{i}" for i in range(300)]
    # Appended concurrently: the two processes' entries interleave.
    rooms = [r[4] for r in rows]
    switches = sum(1 for x, y in itertools.pairwise(rooms) if x != y)
    assert switches >= 2, "the appenders did not overlap"
    assert heads[-1][0] == 600 and len(heads) >= 2


def test_a_server_with_another_signing_key_is_refused(postgres_server: str) -> None:
    backend = Backend("postgresql", new_database(postgres_server))
    with backend.audit_log(tempfile.mkdtemp()) as log:
        log.append("join", room="ward")
    other = tempfile.mkdtemp(prefix="medverse-audit-key-")  # a key of its own
    with backend.database() as db, pytest.raises(ValueError, match="same key"):
        PostgresAuditLog(db, other)


async def test_two_servers_on_one_database_keep_one_verifiable_log(
    postgres_server: str,
) -> None:
    url = new_database(postgres_server)
    data = tempfile.mkdtemp(prefix="medverse-cluster-")  # the shared volume
    cycles = 12

    async def visits(srv: ServerProcess, prefix: str) -> None:
        for i in range(cycles):
            async with connect(srv.url, room=f"{prefix}{i % 3}", name=prefix, ping_interval=0):
                pass

    with (
        run_server(database_url=url, data_dir=data) as a,
        run_server(database_url=url, data_dir=data) as b,
    ):
        await asyncio.gather(visits(a, "a"), visits(b, "b"))
    env = dict(os.environ, MEDVERSE_DATABASE_URL=url)
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", "audit", "verify", "--data-dir", data],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "OK: the log is intact" in out.stdout, out.stdout + out.stderr
    with Backend("postgresql", url).audit_source(data) as src:
        rows = src.rows()
    kinds = [(r[3], (r[4] or "")[:1]) for r in rows]
    for prefix in ("a", "b"):
        assert kinds.count(("join", prefix)) == cycles
        assert kinds.count(("leave", prefix)) == cycles
    assert [k for k, _ in kinds].count("server_start") == 2
    assert [k for k, _ in kinds].count("server_stop") == 2


# --------------------------------------------------------------------------- bans


def test_a_ban_made_on_one_server_holds_on_the_others_within_a_second(
    postgres_server: str,
) -> None:
    backend = Backend("postgresql", new_database(postgres_server))
    with backend.ban_store("unused", refresh=0.2) as here, backend.ban_store("unused") as there:
        ban = here.add("ward", "troll", "Troll", "", "dr-a", None)
        assert [b.id for b in here.active("ward", "troll")] == [ban.id]  # at once here
        deadline = time.monotonic() + 5.0
        while not there.active("ward", "troll"):
            assert time.monotonic() < deadline, "the other server never saw the ban"
            time.sleep(0.05)
        here.lift("ward", ban.id, "dr-a")
        assert here.active("ward") == []
        while there.active("ward"):
            assert time.monotonic() < deadline, "the other server never saw the ban lifted"
            time.sleep(0.05)


def test_a_ban_that_cannot_be_stored_is_a_typed_error(postgres_server: str) -> None:
    from medverse.protocol.errors import ProtocolError

    backend = Backend("postgresql", new_database(postgres_server))
    with backend.ban_store("unused") as bans:
        bans.db.close()  # type: ignore[attr-defined]  # the database goes away
        with pytest.raises(ProtocolError) as err:
            bans.add("ward", "troll", "Troll", "", "dr-a", None)
        assert err.value.code.value == "internal" and "could not be stored" in err.value.message


# --------------------------------------------------------------------------- standing


def test_a_sessions_removals_and_standing_are_read_back_until_it_ends(backend: Backend) -> None:
    """What one server stored for a room's session, another (or the same, restarted) reads
    while the session is alive; a session not marked alive for too long, or ended, is gone
    (its rows deleted), and another room's rows are its own."""
    from medverse.server.standing import Standing

    data = tempfile.mkdtemp(prefix="medverse-standing-")
    with backend.standing_store(data) as here, backend.standing_store(data) as there:
        t0 = time.time()
        assert here.load("ward", t0 - 30) is None
        here.remove("ward", "s1", "tok-troll", "threats")
        here.set_standing("ward", "s1", "patient", Standing(muted=True))
        role = ("participant", frozenset({"publish_audio", "manipulate_objects"}))
        here.set_standing("ward", "s1", "patient", Standing(muted=True, role=role))
        here.set_standing("ward", "s1", "nurse", Standing(role=("host", frozenset())))
        here.set_standing("clinic", "s9", "other", Standing(muted=True))
        state = there.load("ward", t0 - 30)
        assert state is not None and state.session == "s1"
        assert state.removed == {"tok-troll": "threats"}
        assert state.standing == {
            "patient": Standing(True, role),
            "nurse": Standing(False, ("host", frozenset())),
        }
        # A server that does not run the room asks about one token (reads only).
        assert there.removal("ward", "tok-troll", t0 - 30) == "threats"
        assert there.removal("ward", "tok-patient", t0 - 30) is None
        assert there.removal("ward", "tok-troll", time.time() + 1) is None  # session over
        assert there.removal("clinic", "tok-troll", t0 - 30) is None
        there.touch("ward", "s1")
        # A session marked alive before the given time is over: read as none, and deleted,
        # with every other room's session as old (a server killed, a room never opened
        # again: nobody could continue them).
        assert there.load("ward", time.time() + 1) is None
        assert here.load("ward", t0 - 30) is None
        assert here.load("clinic", t0 - 30) is None
        here.set_standing("clinic", "s9", "other", Standing(muted=True))
        # Ending a session deletes its rows, not another session's or room's.
        assert there.load("clinic", t0 - 30) is not None
        there.end("clinic", "another-session")
        assert there.load("clinic", t0 - 30) is not None
        here.end("clinic", "s9")
        assert there.load("clinic", t0 - 30) is None


def test_a_late_write_of_an_older_session_does_not_take_the_room_back(backend: Backend) -> None:
    """A write of a session the room has left behind (one that was still in flight when the
    room moved on) neither replaces the room's session nor shows in it."""
    from medverse.server.standing import Standing

    data = tempfile.mkdtemp(prefix="medverse-standing-")
    with backend.standing_store(data) as store:
        t0 = time.time()
        store.remove("ward", "s2", "tok-now", "now")
        store.remove("ward", "s1", "tok-late", "late")
        store.set_standing("ward", "s1", "patient", Standing(muted=True))
        state = store.load("ward", t0 - 30)
        assert state is not None and state.session == "s2"
        assert state.removed == {"tok-now": "now"} and state.standing == {}


def test_a_failed_write_leaves_the_file_usable() -> None:
    """A write SQLite refuses is rolled back: the next ones (and the bans in the same file)
    still go through."""
    from medverse.server.standing import SQLiteStandingStore

    store = SQLiteStandingStore.in_dir(tempfile.mkdtemp(prefix="medverse-standing-"))
    try:
        with pytest.raises(sqlite3.Error):
            store.remove("ward", "s1", object(), "")  # type: ignore[arg-type]  # cannot bind
        store.remove("ward", "s1", "tok", "threats")
        state = store.load("ward", time.time() - 30)
        assert state is not None and state.removed == {"tok": "threats"}
    finally:
        store.close()


def test_a_removal_that_cannot_be_stored_is_a_typed_error(postgres_server: str) -> None:
    from medverse.protocol.errors import ProtocolError
    from medverse.server.standing import Standing

    backend = Backend("postgresql", new_database(postgres_server))
    with backend.standing_store("unused") as store:
        store.db.close()  # type: ignore[attr-defined]  # the database goes away
        for write in (
            lambda: store.remove("ward", "s1", "tok", ""),
            lambda: store.set_standing("ward", "s1", "patient", Standing(muted=True)),
        ):
            with pytest.raises(ProtocolError) as err:
                write()
            assert err.value.code.value == "internal"
            assert "could not be stored" in err.value.message


# --------------------------------------------------------------------------- consent


async def test_consent_records_are_kept_in_the_clusters_log(postgres_server: str) -> None:
    import hashlib

    from medverse.client_sdk import JoinError
    from medverse.server.auth import mint_token

    url = new_database(postgres_server)
    data = tempfile.mkdtemp(prefix="medverse-consent-")
    text = "Sessions in this room are recorded in the audit log.\n"
    version = hashlib.sha256(text.encode()).hexdigest()
    consent = os.path.join(data, "consent.txt")
    with open(consent, "w") as f:
        f.write(text)
    secret = "p" * 48

    def tok(who: str) -> str:
        return mint_token(secret.encode(), room="therapy", identity=who, name=who)

    with run_server(
        auth_secret=secret, data_dir=data, database_url=url, consent_file=consent
    ) as srv:
        yes = lambda v, t: v == version  # noqa: E731
        async with connect(srv.url, room="therapy", name="g", token=tok("g"), consent=yes):
            pass
        with pytest.raises(JoinError):
            async with connect(
                srv.url, room="therapy", name="d", token=tok("d"), consent=lambda v, t: False
            ):
                pass
    with Backend("postgresql", url).audit_source(data) as src:
        rows = [r for r in src.rows() if r[3].startswith("consent")]
    assert [(r[3], r[5]) for r in rows] == [("consent", "g"), ("consent_declined", "d")]
    assert version in rows[0][7]


# --------------------------------------------------------------------------- integrity


async def test_acknowledged_annotations_missing_from_postgresql_hold_the_room_back(
    postgres_server: str,
) -> None:
    from .test_integrity import SECRET, make_annotated_room

    backend = Backend("postgresql", new_database(postgres_server))
    data = tempfile.mkdtemp(prefix="medverse-integrity-")
    settings = {"auth_secret": SECRET, "data_dir": data, **backend.settings()}
    with run_server(**settings) as srv:
        ids = await make_annotated_room(srv, "ward")
        await make_annotated_room(srv, "clinic")  # left intact

    async def lose(conn: object) -> None:  # an older copy of the database, restored
        await conn.execute(  # type: ignore[attr-defined]
            "DELETE FROM annotations WHERE room = 'ward' AND id = ANY($1::bigint[])", ids[1:3]
        )

    with backend.database() as db:
        db.run(lose)
    with run_server(**settings) as srv:
        health = srv.get_json("/health")
        assert health["status"] == "degraded"
        assert list(health["integrity"]["incomplete_rooms"]) == ["ward"]
        assert health["integrity"]["incomplete_rooms"]["ward"]["missing_annotations"] == ids[1:3]


# --------------------------------------------------------------------------- outages


async def test_a_change_made_while_the_database_is_away_is_stored_once_it_is_back() -> None:
    from .pgservice import running_postgres
    from .test_persistence import ASSET, provide

    with running_postgres() as pg:  # a server of its own: it goes away for a while
        url = pg.create_database()
        data = tempfile.mkdtemp(prefix="medverse-outage-")
        with run_server(data_dir=data, database_url=url) as srv:
            await provide(srv.url, "ward")
            async with connect(srv.url, room="ward", name="a", ping_interval=0) as s:
                await s.objects.wait_synced()
                oid = await s.spawn(ASSET)
                await asyncio.to_thread(pg.halt)
                pending = asyncio.ensure_future(s.annotate(oid, "pin", [(0, 0, 0)], text="late"))
                frames = s.frames_received
                await asyncio.sleep(1.5)
                assert not pending.done()  # not acknowledged: not stored yet
                # The room carries on meanwhile: its ticks never wait for the database (30 Hz;
                # half of that is headroom for a busy machine).
                assert s.frames_received - frames >= 22, s.frames_received - frames
                await asyncio.to_thread(pg.start)
                aid = await asyncio.wait_for(pending, 40)
        backend = Backend("postgresql", url)
        with backend.object_store(data) as store:
            record = store.load_room("ward")
        assert [(a.id, a.text) for a in record.annotations] == [(aid, "late")]
        with backend.audit_source(data) as src:
            report = verify(src)
            kinds = [r[3] for r in src.rows()]
        assert report.ok, report.problems
        assert "annotation_created" in kinds and kinds.count("server_stop") == 1


async def test_a_ban_waits_for_a_hanging_database_without_holding_up_the_room() -> None:
    """A database that stops answering delays the host's ban, not the room: the ticks and
    the other members carry on; once it answers, the ban is stored, acknowledged and the
    banned member removed."""
    from medverse.server.auth import mint_token

    from .pgservice import running_postgres

    secret = "d" * 48

    def tok(who: str, role: str = "participant") -> str:
        return mint_token(secret.encode(), room="ward", identity=who, name=who, role=role)

    with running_postgres() as pg:  # a server of its own: it hangs for a while
        url = pg.create_database()
        data = tempfile.mkdtemp(prefix="medverse-hang-")
        with run_server(data_dir=data, database_url=url, auth_secret=secret) as srv:
            host = connect(srv.url, "ward", token=tok("dr-a", "host"), ping_interval=0)
            troll = connect(srv.url, "ward", token=tok("troll"), ping_interval=0)
            other = connect(srv.url, "ward", token=tok("pat"), ping_interval=0)
            for s in (host, troll, other):
                await s.start()
            try:
                await asyncio.to_thread(pg.freeze)
                try:
                    pending = asyncio.ensure_future(
                        host.moderate("ban", troll.member_id, "threats")
                    )
                    frames = other.frames_received
                    await asyncio.sleep(1.5)
                    assert not pending.done()  # not stored: not answered
                    # 30 Hz meanwhile (half of it is headroom for a busy machine).
                    assert other.frames_received - frames >= 22, other.frames_received - frames
                    # Other members' requests are answered meanwhile (the host's next
                    # moderation would wait for the ban: host actions apply in order).
                    await asyncio.wait_for(other.pause(True), 5)
                    await asyncio.wait_for(other.pause(False), 5)
                finally:
                    await asyncio.to_thread(pg.thaw)
                await asyncio.wait_for(pending, 40)
                ended = await asyncio.wait_for(troll.wait_closed(), 10)
                assert (ended.code, ended.message) == ("banned", "threats")
            finally:
                for s in (host, troll, other):
                    await s.close()
        backend = Backend("postgresql", url)
        with backend.ban_store(data) as bans:
            assert [b.reason for b in bans.active("ward", "troll")] == ["threats"]


async def test_an_acknowledged_action_is_in_the_clusters_log_already(
    postgres_server: str,
) -> None:
    """The cluster's log commits in batches after the append; a request that was audited is
    acknowledged only once its entry is committed, so a server killed right after an ack has
    not lost the ack's audit entry."""
    import asyncpg

    from medverse.server.auth import mint_token

    secret = "e" * 48
    url = new_database(postgres_server)

    def tok(who: str, role: str = "participant") -> str:
        return mint_token(secret.encode(), room="ward", identity=who, name=who, role=role)

    data = tempfile.mkdtemp(prefix="medverse-ackaudit-")
    with run_server(data_dir=data, database_url=url, auth_secret=secret) as srv:
        host = connect(srv.url, "ward", token=tok("dr-a", "host"), ping_interval=0)
        pat = connect(srv.url, "ward", token=tok("pat"), ping_interval=0)
        await host.start()
        await pat.start()
        conn = await asyncpg.connect(url)
        try:
            for i in range(20):
                await host.moderate("mute" if i % 2 == 0 else "allow_unmute", pat.member_id)
                n = await conn.fetchval(
                    "SELECT count(*) FROM audit_entries WHERE room = 'ward' "
                    "AND kind IN ('muted', 'unmute_allowed')"
                )
                assert n == i + 1, (i, n)
        finally:
            await conn.close()
            await host.close()
            await pat.close()


def test_a_batch_the_database_cannot_take_fails_whole_and_at_once(postgres_server: str) -> None:
    from functools import partial

    from medverse.server.store import PostgresObjectStore

    backend = Backend("postgresql", new_database(postgres_server))
    with backend.database() as db:
        store = PostgresObjectStore(db)
        db.close()  # out of reach: not worth trying each operation on its own
        t0 = time.monotonic()
        errors = store.run_batch([partial(store.delete_annotation, "r", i, i) for i in (1, 2, 3)])
        assert all(isinstance(e, DatabaseUnavailable) for e in errors), errors
        assert time.monotonic() - t0 < 5.0
