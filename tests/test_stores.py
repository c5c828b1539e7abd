"""The durable stores' behaviour, the same on each backend (SQLite in the data directory and
PostgreSQL): the audit log's appends, signed heads, proofs, tamper detection and reading;
bans. (Objects and annotations: tests/test_persistence.py, on both backends too.)"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from medverse.server.audit import prove, read_entries, verify

from .backends import Backend


def make_log(backend: Backend, n: int = 20) -> Path:
    d = Path(tempfile.mkdtemp(prefix="medverse-audit-"))
    with backend.audit_log(d) as log:
        for i in range(n):
            log.append(
                "join", room="ward", actor=f"user{i}", subject=str(i + 1), role="participant"
            )
            if i % 7 == 6:
                log.sign()
    return d


def audit_cli(
    capsys: pytest.CaptureFixture[str], backend: Backend, *args: str
) -> tuple[int, str, str]:
    """``medverse audit ARGS`` on the backend's log, in this process."""
    from medverse.server.cli import main

    code = main(["audit", *args, *backend.audit_args()])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_intact_log_verifies_and_proves(backend: Backend) -> None:
    d = make_log(backend)
    with backend.audit_source(d) as src:
        report = verify(src)
    assert report.ok and report.entries == 20 and report.signed_size == 20, report.problems
    with backend.audit_source(d) as src:
        p = prove(src, 5)
    assert p["verified"] and p["content"]["actor"] == "user4" and p["tree_size"] == 20
    with backend.audit_source(d) as src:
        heads = src.heads()
    # Heads signed along the way (each consistent with the next, as verify checked).
    assert {7, 14, 20} <= {h[0] for h in heads}


@pytest.mark.parametrize(
    ("name", "sql", "args", "expect"),
    [
        ("edit", "UPDATE {entries} SET actor = 'mallory' WHERE seq = 3", (), "entry 3 modified"),
        ("delete", "DELETE FROM {entries} WHERE seq = 10", (), "deleted"),
        ("delete tail", "DELETE FROM {entries} WHERE seq = 20", (), "deleted"),
        (
            "reorder",
            "UPDATE {entries} SET actor = CASE seq WHEN 4 THEN 'user5' ELSE 'user4' END "
            "WHERE seq IN (4, 5)",
            (),
            "modified",
        ),
        (
            "rewrite hash too",
            'UPDATE {entries} SET detail = \'{{"role":"host"}}\', leaf = ? WHERE seq = 2',
            (b"\x11" * 32,),
            "modified",
        ),
        ("drop a head's root", "UPDATE {heads} SET root = ? WHERE size = 14", (b"\0" * 32,), "bad"),
    ],
)
def test_tampering_is_detected(
    backend: Backend, name: str, sql: str, args: tuple[object, ...], expect: str
) -> None:
    d = make_log(backend)
    backend.execute(d, sql, *args)
    with backend.audit_source(d) as src:
        report = verify(src)
    assert not report.ok, name
    assert any(expect in p for p in report.problems), report.problems


def test_verify_head_show_and_against_on_the_command_line(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    d = make_log(backend)
    code, out, err = audit_cli(capsys, backend, "verify", "--data-dir", str(d))
    assert code == 0 and "20 entries" in out and "OK" in out, out + err
    saved = d.parent / f"{d.name}-head.json"
    code, _, err = audit_cli(capsys, backend, "head", "--data-dir", str(d), "--out", str(saved))
    assert code == 0 and json.loads(saved.read_text())["size"] == 20, err
    with backend.audit_log(d) as log:  # the log grows: still consistent with the saved head
        for i in range(5):
            log.append("leave", room="clinic", actor=f"user{i}")
    args = ("verify", "--data-dir", str(d), "--against", str(saved))
    code, out, _ = audit_cli(capsys, backend, *args)
    assert code == 0 and "consistent with the head saved" in out, out
    code, out, _ = audit_cli(capsys, backend, "show", "--data-dir", str(d), "--room", "clinic")
    assert code == 0 and len(out.splitlines()) == 5 and "actor=user0" in out, out
    code, out, _ = audit_cli(capsys, backend, "prove", "21", "--data-dir", str(d))
    assert code == 0 and json.loads(out)["verified"] is True, out
    # Truncated together with its heads: the log alone cannot tell, the saved head can.
    backend.execute(d, "DELETE FROM {entries} WHERE seq > 17")
    backend.execute(d, "DELETE FROM {heads} WHERE size > 17")
    assert audit_cli(capsys, backend, "verify", "--data-dir", str(d))[0] == 0
    code, out, _ = audit_cli(capsys, backend, *args)
    assert code == 1 and "holds 17 entries" in out and "truncated" in out, out


def test_retention_prunes_content_but_keeps_the_tree(backend: Backend) -> None:
    d = make_log(backend, 5)
    with backend.audit_log(d, retention_days=1e-9):  # everything is older than that
        pass
    with backend.audit_source(d) as src:
        rows = src.rows()
        assert sum(1 for r in rows if r[9]) == 5 and all(r[5] is None for r in rows[:5])
    with backend.audit_source(d) as src:
        assert verify(src).ok
    with backend.audit_source(d) as src:
        lines = read_entries(src)
    assert sum("pruned" in line for line in lines) == 5


# --------------------------------------------------------------------------- bans


def test_bans_are_kept_lifted_and_expire(backend: Backend) -> None:
    d = tempfile.mkdtemp(prefix="medverse-bans-")
    with backend.ban_store(d) as bans:
        forever = bans.add("ward", "troll", "Troll", "shouting", "dr-a", None)
        brief = bans.add("ward", "pest", "Pest", "", "dr-a", time.time() + 0.5)
        bans.add("clinic", "troll", "Troll", "", "dr-b", None)
        assert [b.id for b in bans.active("ward")] == [forever.id, brief.id]
        assert [b.subject for b in bans.active("ward", "troll")] == ["troll"]
        assert bans.lift("ward", forever.id, "dr-a") == forever
        assert bans.lift("ward", forever.id, "dr-a") is None  # lifted already
        assert bans.lift("clinic", brief.id, "dr-a") is None  # another room's
        assert [b.subject for b in bans.active("ward")] == ["pest"]
    time.sleep(0.6)
    with backend.ban_store(d) as bans:  # as after a restart
        assert bans.active("ward") == []  # lifted, and expired
        assert [(b.subject, b.actor) for b in bans.active("clinic")] == [("troll", "dr-b")]
