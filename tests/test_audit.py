"""The audit log: Merkle proofs, signed heads, tamper detection, and what the server records."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medverse.client_sdk import Pose, connect
from medverse.server.audit import (
    DB_FILE,
    AuditLog,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    prove,
    tree_root,
    verify,
    verify_consistency,
    verify_inclusion,
)

from .conftest import ROOT, run_server
from .helpers import wait_for


def reference_root(d: list[bytes]) -> bytes:
    """RFC 6962 MTH, written as the RFC defines it."""
    import hashlib

    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return node_hash(reference_root(d[:k]), reference_root(d[k:]))


def test_rfc6962_empty_and_single_leaf() -> None:
    assert tree_root([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.data())
def test_proofs_verify_and_roots_agree(n: int, data: st.DataObject) -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    root = tree_root(leaves)
    assert root == reference_root(leaves)
    f = Frontier()
    for leaf in leaves:
        f.push(leaf)
    assert f.root() == root
    i = data.draw(st.integers(0, n - 1))
    proof = inclusion_proof(i, leaves)
    assert verify_inclusion(leaves[i], i, n, proof, root)
    assert not verify_inclusion(leaf_hash(b"other"), i, n, proof, root)
    m = data.draw(st.integers(1, n))
    cproof = consistency_proof(m, leaves)
    assert verify_consistency(m, n, cproof, tree_root(leaves[:m]), root)
    if m < n:
        assert not verify_consistency(m, n, cproof, leaf_hash(b"forged"), root)


def make_log(n: int = 20) -> Path:
    d = Path(tempfile.mkdtemp(prefix="medverse-audit-"))
    log = AuditLog(d)
    for i in range(n):
        log.append("join", room="ward", actor=f"user{i}", subject=str(i + 1), role="participant")
        if i % 7 == 6:
            log.sign()
    log.close()
    return d


def tamper(d: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(d / DB_FILE)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_intact_log_verifies_and_proves() -> None:
    d = make_log()
    report = verify(d)
    assert report.ok and report.entries == 20 and report.signed_size == 20
    p = prove(d, 5)
    assert p["verified"] and p["content"]["actor"] == "user4" and p["tree_size"] == 20


@pytest.mark.parametrize(
    ("name", "sql", "args", "expect"),
    [
        ("edit", "UPDATE entries SET actor = 'mallory' WHERE seq = 3", (), "entry 3 modified"),
        ("delete", "DELETE FROM entries WHERE seq = 10", (), "deleted"),
        ("delete tail", "DELETE FROM entries WHERE seq = 20", (), "deleted"),
        (
            "insert",
            "INSERT INTO entries (seq, time, kind, room, actor, subject, detail, leaf) "
            "VALUES (21, 0, 'join', 'ward', 'ghost', '99', NULL, x'00')",
            (),
            "modified",
        ),
        (
            "reorder",
            "UPDATE entries SET actor = CASE seq WHEN 4 THEN 'user5' ELSE 'user4' END "
            "WHERE seq IN (4, 5)",
            (),
            "modified",
        ),
        (
            "rewrite hash too",
            'UPDATE entries SET detail = \'{"role":"host"}\', leaf = ? WHERE seq = 2',
            (b"\x11" * 32,),
            "modified",
        ),
    ],
)
def test_tampering_is_detected(name: str, sql: str, args: tuple, expect: str) -> None:
    d = make_log()
    tamper(d, sql, *args)
    report = verify(d)
    assert not report.ok, name
    assert any(expect in p for p in report.problems), report.problems


def test_rewriting_content_and_hash_consistently_breaks_the_signed_root() -> None:
    from medverse.server.audit import entry_bytes

    d = make_log()
    db = sqlite3.connect(d / DB_FILE)
    seq, t, kind, room, _actor, subject, detail = db.execute(
        "SELECT seq, time, kind, room, actor, subject, detail FROM entries WHERE seq = 8"
    ).fetchone()
    forged = leaf_hash(entry_bytes(seq, t, kind, room, "mallory", subject, detail))
    db.execute("UPDATE entries SET actor = 'mallory', leaf = ? WHERE seq = 8", (forged,))
    db.commit()
    db.close()
    report = verify(d)
    assert any("signed root" in p for p in report.problems), report.problems


def test_retention_prunes_content_but_keeps_the_tree() -> None:
    d = make_log(5)
    log = AuditLog(d, retention_days=1e-9)  # everything is older than that
    log.close()
    db = sqlite3.connect(d / DB_FILE)
    assert db.execute("SELECT COUNT(*) FROM entries WHERE actor IS NOT NULL").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM entries WHERE pruned = 1").fetchone()[0] == 5
    db.close()
    assert verify(d).ok


async def test_server_records_security_events_without_content() -> None:
    data = Path(tempfile.mkdtemp(prefix="medverse-audit-srv-"))
    secret = "k" * 48
    from medverse.server.auth import mint_token

    tok = mint_token(secret.encode(), room="ward", identity="dr-a", name="Dr A", role="host")
    with run_server(auth_secret=secret, data_dir=data) as srv:
        async with connect(srv.url, room="ward", name="x", token=tok) as s:
            s.send_pose(head=Pose((1.234, 1.6, 0.0)))
            await wait_for(lambda: s.avatars.get(s.member_id) and s.avatars[s.member_id].head)
        from medverse.client_sdk import JoinError

        with pytest.raises(JoinError):
            async with connect(srv.url, room="ward", name="y", token="bogus"):
                pass
    db = sqlite3.connect(data / DB_FILE)
    rows = db.execute("SELECT kind, room, actor, detail FROM entries ORDER BY seq").fetchall()
    db.close()
    kinds = [r[0] for r in rows]
    assert "join" in kinds and "leave" in kinds and "join_refused" in kinds
    joined = rows[kinds.index("join")]
    assert joined[1:3] == ("ward", "dr-a") and json.loads(joined[3])["role"] == "host"
    text = json.dumps(rows)
    assert "1.234" not in text and "1234" not in text  # no pose content
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", "audit", "verify", "--data-dir", str(data)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medverse.server.cli",
            "audit",
            "prove",
            "2",
            "--data-dir",
            str(data),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["verified"] is True
    tamper(data, "UPDATE entries SET actor = 'someone-else' WHERE kind = 'join'")
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", "audit", "verify", "--data-dir", str(data)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "TAMPERED" in out.stdout


# --------------------------------------------------------------------------- saved heads


def audit_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``medverse audit ARGS`` in this process: exit code, stdout, stderr."""
    from medverse.server.cli import main

    code = main(["audit", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def save_head(capsys: pytest.CaptureFixture[str], d: Path) -> Path:
    head = d.parent / f"{d.name}-head.json"
    code, _, err = audit_cli(capsys, "head", "--data-dir", str(d), "--out", str(head))
    assert code == 0, err
    return head


def test_a_saved_head_is_the_admin_apis_head_and_verifies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = make_log()
    code, out, _ = audit_cli(capsys, "head", "--data-dir", str(d))
    head = json.loads(out)
    assert (
        code == 0
        and head["size"] == 20
        and set(head)
        == {
            "size",
            "time_ms",
            "root",
            "signature",
            "public_key",
        }
    )
    saved = save_head(capsys, d)
    assert json.loads(saved.read_text()) == head
    log = AuditLog(d)  # the log grows after the head was saved: still consistent
    for i in range(13):
        log.append("leave", room="ward", actor=f"user{i}")
    log.close()
    code, out, _ = audit_cli(capsys, "verify", "--data-dir", str(d), "--against", str(saved))
    assert code == 0 and "consistent with the head saved" in out and "OK" in out, out


def test_truncation_is_detected_against_a_saved_head(capsys: pytest.CaptureFixture[str]) -> None:
    d = make_log()
    saved = save_head(capsys, d)
    # Delete the last three entries together with the signed heads that covered them: the
    # log alone still verifies (it cannot know what it lost) ...
    tamper(d, "DELETE FROM entries WHERE seq > 17")
    tamper(d, "DELETE FROM tree_heads WHERE size > 17")
    assert audit_cli(capsys, "verify", "--data-dir", str(d))[0] == 0
    # ... but not against the head kept elsewhere.
    code, out, _ = audit_cli(capsys, "verify", "--data-dir", str(d), "--against", str(saved))
    (line,) = [x for x in out.splitlines() if x.startswith("TAMPERED")]
    assert code == 1 and "holds 17 entries" in line and "truncated" in line, out


def test_a_fork_is_detected_against_a_saved_head(capsys: pytest.CaptureFixture[str]) -> None:
    d = make_log()
    saved = save_head(capsys, d)
    # Another history signed with the same key (whoever holds the key can rewrite and re-sign
    # everything): consistent in itself, and as long as the one the head covered.
    other = Path(tempfile.mkdtemp(prefix="medverse-audit-fork-"))
    for name in ("audit_signing_key.pem", "audit_public_key.pem"):
        (other / name).write_bytes((d / name).read_bytes())
    log = AuditLog(other)
    for i in range(25):
        actor = "mallory" if i == 4 else f"user{i}"
        log.append("join", room="ward", actor=actor, subject=str(i + 1), role="participant")
    log.close()
    assert audit_cli(capsys, "verify", "--data-dir", str(other))[0] == 0
    code, out, _ = audit_cli(capsys, "verify", "--data-dir", str(other), "--against", str(saved))
    (line,) = [x for x in out.splitlines() if x.startswith("TAMPERED")]
    assert code == 1 and "first 20 entries" in line and "fork" in line, out


def test_a_rolled_back_database_is_detected_against_a_saved_head(
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = make_log(10)
    backup = d.parent / f"{d.name}-backup.sqlite3"
    backup.write_bytes((d / DB_FILE).read_bytes())  # an earlier copy of the database file
    log = AuditLog(d)
    for i in range(10):
        log.append("removed", room="ward", actor="dr-a", subject=str(i + 1))
    log.close()
    saved = save_head(capsys, d)

    def roll_back() -> None:
        for suffix in ("-wal", "-shm"):
            (d / (DB_FILE + suffix)).unlink(missing_ok=True)
        (d / DB_FILE).write_bytes(backup.read_bytes())

    roll_back()
    assert audit_cli(capsys, "verify", "--data-dir", str(d))[0] == 0
    code, out, _ = audit_cli(capsys, "verify", "--data-dir", str(d), "--against", str(saved))
    assert code == 1 and "rolled back to an earlier copy" in out, out
    # Rolled back, then written to for long enough to outgrow the saved head: still found.
    log = AuditLog(d)
    for i in range(15):
        log.append("join", room="ward", actor=f"late{i}")
    log.close()
    assert audit_cli(capsys, "verify", "--data-dir", str(d))[0] == 0
    code, out, _ = audit_cli(capsys, "verify", "--data-dir", str(d), "--against", str(saved))
    assert code == 1 and "rolled back" in out and "first 20 entries" in out, out


def test_a_head_from_another_log_or_altered_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    d, other = make_log(), make_log(5)
    saved = save_head(capsys, other)  # another key
    code, out, _ = audit_cli(capsys, "verify", "--data-dir", str(d), "--against", str(saved))
    assert code == 1 and "another key" in out, out
    saved = save_head(capsys, d)
    head = json.loads(saved.read_text())
    saved.write_text(json.dumps(dict(head, size=head["size"] - 1)))
    code, out, _ = audit_cli(capsys, "verify", "--data-dir", str(d), "--against", str(saved))
    assert code == 1 and "signature does not verify" in out, out
    saved.write_text("{not json")
    code, _, err = audit_cli(capsys, "verify", "--data-dir", str(d), "--against", str(saved))
    assert code == 2 and len(err.splitlines()) == 1 and str(saved) in err, err


def test_show_prints_one_line_per_entry_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    d = Path(tempfile.mkdtemp(prefix="medverse-audit-show-"))
    log = AuditLog(d)
    log.append("join", room="ward", actor="dr-a", subject="1", name="Dr A", role="host")
    log.append("join", room="clinic", actor="pat\nforged 99 line", subject="2", role="participant")
    log.append("removed", room="ward", actor="dr-a", subject="3", reason="shouting, again")
    log.close()
    code, out, _ = audit_cli(capsys, "show", "--data-dir", str(d))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3, out
    assert lines[0].split()[:3] == ["1", lines[0].split()[1], "join"]
    assert "room=ward" in lines[0] and "actor=dr-a" in lines[0] and 'name="Dr A"' in lines[0]
    assert 'actor="pat\\nforged 99 line"' in lines[1]  # a line break cannot forge an entry
    assert 'reason="shouting, again"' in lines[2]
    code, out, _ = audit_cli(capsys, "show", "--data-dir", str(d), "--room", "ward")
    assert [line.split()[0] for line in out.splitlines()] == ["1", "3"]
    code, out, _ = audit_cli(capsys, "show", "--data-dir", str(d), "--identity", "dr-a")
    assert [line.split()[0] for line in out.splitlines()] == ["1", "3"]
    code, out, _ = audit_cli(capsys, "show", "--data-dir", str(d), "--since", "1h")
    assert len(out.splitlines()) == 3
    code, out, _ = audit_cli(capsys, "show", "--data-dir", str(d), "--since", "2999-01-01")
    assert code == 0 and out == ""
    code, _, err = audit_cli(capsys, "show", "--data-dir", str(d), "--since", "last week")
    assert code == 2 and "--since" in err
