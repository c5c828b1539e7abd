"""Tamper-evident audit log: an append-only SQLite table under an RFC 6962 / 9162 Merkle tree.

Every security-relevant event (joins, leaves, token refusals, resumes, flood closes ...) is an
entry: canonical JSON of its sequence number, time, kind, room, actor, subject and details,
never pose or audio content. Leaf hash = SHA-256(0x00 || entry), node hash = SHA-256(0x01 ||
left || right). The server signs tree heads (size, time, root) with an Ed25519 key kept in the
data directory, so editing, deleting, inserting or reordering rows, even with the database
open in another program, shows up in ``medverse audit verify``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

DB_FILE = "audit.sqlite3"
KEY_FILE = "audit_signing_key.pem"
PUBLIC_KEY_FILE = "audit_public_key.pem"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    room TEXT,
    actor TEXT,
    subject TEXT,
    detail TEXT,
    leaf BLOB NOT NULL,
    pruned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tree_heads (
    size INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    root BLOB NOT NULL,
    signature BLOB NOT NULL
);
"""


# --------------------------------------------------------------------------- Merkle tree


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_root(leaves: list[bytes]) -> bytes:
    """MTH of the leaf hashes (RFC 6962 section 2.1)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    # Bottom-up pairing gives the same tree as the recursive definition: a lone last node is
    # carried up unchanged, exactly as the "largest power of two" split places it.
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Frontier:
    """The roots of the perfect subtrees of an append-only tree: O(log n) per append and root."""

    def __init__(self) -> None:
        self._peaks: list[tuple[int, bytes]] = []  # (height, hash), tallest first

    def push(self, leaf: bytes) -> None:
        peaks = self._peaks
        peaks.append((0, leaf))
        while len(peaks) >= 2 and peaks[-1][0] == peaks[-2][0]:
            h, right = peaks.pop()
            _, left = peaks.pop()
            peaks.append((h + 1, node_hash(left, right)))

    def root(self) -> bytes:
        """Equals :func:`tree_root` of all leaves pushed: the left subtree of an RFC 6962 tree
        is always the largest perfect one, so the peaks fold from the right."""
        if not self._peaks:
            return hashlib.sha256(b"").digest()
        r = self._peaks[-1][1]
        for _, peak in reversed(self._peaks[:-1]):
            r = node_hash(peak, r)
        return r


def inclusion_proof(index: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) (RFC 6962 section 2.1.1)."""
    n = len(leaves)
    if n <= 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), tree_root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), tree_root(leaves[:k])]


def consistency_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) (RFC 6962 section 2.1.2)."""

    def subproof(m: int, d: list[bytes], complete: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if complete else [tree_root(d)]
        k = _split(n)
        if m <= k:
            return [*subproof(m, d[:k], complete), tree_root(d[k:])]
        return [*subproof(m - k, d[k:], False), tree_root(d[:k])]

    if not 0 < m <= len(leaves):
        raise ValueError("consistency proofs need 0 < m <= n")
    return subproof(m, leaves, True)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(m: int, n: int, proof: list[bytes], old: bytes, new: bytes) -> bool:
    """RFC 9162 section 2.1.4.2."""
    if m == n:
        return not proof and old == new
    if not 0 < m < n or not proof:
        return False
    if m & (m - 1) == 0:  # m is a power of two: the old root is the first node
        proof = [old, *proof]
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old and sr == new and sn == 0


# --------------------------------------------------------------------------- the log


def entry_bytes(
    seq: int,
    t: float,
    kind: str,
    room: str | None,
    actor: str | None,
    subject: str | None,
    detail: str | None,
) -> bytes:
    """Canonical encoding of one entry: what the leaf hash covers."""
    return json.dumps(
        [seq, round(t, 6), kind, room, actor, subject, detail],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def tree_head_message(size: int, time_ms: int, root: bytes) -> bytes:
    return b"medverse-audit-v1" + struct.pack(">QQ", size, time_ms) + root


def _load_key(data_dir: Path) -> Ed25519PrivateKey:
    path = data_dir / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key
    key = Ed25519PrivateKey.generate()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    (data_dir / PUBLIC_KEY_FILE).write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


class AuditLog:
    """Appends entries durably and signs a tree head shortly after each change."""

    def __init__(
        self, data_dir: str | Path, retention_days: float = 0.0, sign_delay: float = 0.5
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.data_dir / DB_FILE, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._key = _load_key(self.data_dir)
        self.retention_days = retention_days
        self.sign_delay = sign_delay
        self._leaves = [
            bytes(r[0]) for r in self._db.execute("SELECT leaf FROM entries ORDER BY seq")
        ]
        self._frontier = Frontier()
        for leaf in self._leaves:
            self._frontier.push(leaf)
        self._sign_timer: asyncio.TimerHandle | None = None
        self._signed_size = self._db.execute(
            "SELECT COALESCE(MAX(size), 0) FROM tree_heads"
        ).fetchone()[0]
        if retention_days > 0:
            self.prune()

    @property
    def size(self) -> int:
        return len(self._leaves)

    def append(
        self,
        kind: str,
        *,
        room: str | None = None,
        actor: str | None = None,
        subject: str | None = None,
        **detail: Any,
    ) -> int:
        """Record one event; returns its sequence number (from 1)."""
        seq = len(self._leaves) + 1
        t = time.time()
        det = json.dumps(detail, separators=(",", ":"), sort_keys=True) if detail else None
        leaf = leaf_hash(entry_bytes(seq, t, kind, room, actor, subject, det))
        self._db.execute(
            "INSERT INTO entries (seq, time, kind, room, actor, subject, detail, leaf) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, round(t, 6), kind, room, actor, subject, det, leaf),
        )
        self._leaves.append(leaf)
        self._frontier.push(leaf)
        self._schedule_sign()
        return seq

    def _schedule_sign(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.sign()
            return
        if self._sign_timer is None:
            self._sign_timer = loop.call_later(self.sign_delay, self.sign)

    def sign(self) -> None:
        """Sign and store the tree head of everything appended so far."""
        self._sign_timer = None
        size = len(self._leaves)
        if size == self._signed_size:
            return
        root = self._frontier.root()
        time_ms = int(time.time() * 1000)
        sig = self._key.sign(tree_head_message(size, time_ms, root))
        self._db.execute(
            "INSERT OR REPLACE INTO tree_heads (size, time_ms, root, signature) "
            "VALUES (?, ?, ?, ?)",
            (size, time_ms, root, sig),
        )
        self._signed_size = size

    def signed_head(self) -> dict[str, Any] | None:
        """The newest signed tree head, with the public key that verifies it (hex)."""
        self.sign()
        row = self._db.execute(
            "SELECT size, time_ms, root, signature FROM tree_heads ORDER BY size DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {
            "size": row[0],
            "time_ms": row[1],
            "root": bytes(row[2]).hex(),
            "signature": bytes(row[3]).hex(),
            "public_key": public.hex(),
        }

    def prune(self) -> int:
        """Drop the content of entries past the retention period, keeping their leaf hashes
        (so the tree still verifies). Returns how many were pruned."""
        cutoff = time.time() - self.retention_days * 86400
        cur = self._db.execute(
            "UPDATE entries SET room = NULL, actor = NULL, subject = NULL, detail = NULL, "
            "pruned = 1 WHERE time < ? AND pruned = 0",
            (cutoff,),
        )
        return cur.rowcount

    def close(self) -> None:
        if self._sign_timer is not None:
            self._sign_timer.cancel()
        self.sign()
        self._db.close()


# --------------------------------------------------------------------------- verification


class AuditRecorder:
    """Where the server's parts record security-relevant events: appends to the audit log once
    it is open (``log``), and never lets a failing append break a session or a room."""

    def __init__(self) -> None:
        self._log: AuditLog | None = None

    @property
    def log(self) -> AuditLog | None:
        """The open log (None before :meth:`open` and after :meth:`close`)."""
        return self._log

    def open(self, data_dir: str | Path, retention_days: float = 0.0, **fields: Any) -> None:
        """Open the log in ``data_dir`` and record the server's start (with ``fields``)."""
        self._log = AuditLog(data_dir, retention_days=retention_days)
        self._log.append("server_start", **fields)

    def close(self) -> None:
        """Record the server's stop and close the log."""
        if self._log is not None:
            self._log.append("server_stop")
            self._log.close()
            self._log = None

    def __call__(
        self,
        kind: str,
        room: str | None = None,
        actor: str | None = None,
        subject: str | None = None,
        **fields: Any,
    ) -> None:
        if self._log is None:
            return
        try:
            self._log.append(kind, room=room, actor=actor, subject=subject, **fields)
        except Exception:
            logging.getLogger("medverse.audit").exception("audit append failed")


@dataclass
class VerifyReport:
    entries: int
    signed_size: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _open_readonly(data_dir: Path) -> sqlite3.Connection:
    """The audit database of ``data_dir``, read-only; ValueError naming what is missing."""
    if not data_dir.is_dir():
        raise ValueError(f"no data directory {data_dir.resolve()}")
    if not (data_dir / DB_FILE).is_file():
        raise ValueError(f"no audit log in {data_dir.resolve()} ({DB_FILE} is missing)")
    return sqlite3.connect(f"file:{data_dir / DB_FILE}?mode=ro", uri=True)


def _public_key(data_dir: Path) -> Ed25519PublicKey:
    pub = serialization.load_pem_public_key((data_dir / PUBLIC_KEY_FILE).read_bytes())
    if not isinstance(pub, Ed25519PublicKey):
        raise ValueError(f"{data_dir / PUBLIC_KEY_FILE} is not an Ed25519 public key")
    return pub


def _recompute(db: sqlite3.Connection, problems: list[str]) -> tuple[int, list[bytes]]:
    """The number of rows and the leaf hash of every entry, recomputed from its content where
    the content is kept (pruned entries keep only their stored hash); discrepancies are added
    to ``problems``."""
    rows = db.execute(
        "SELECT rowid, seq, time, kind, room, actor, subject, detail, leaf, pruned FROM entries "
        "ORDER BY rowid"
    ).fetchall()
    leaves: list[bytes] = []
    expected = 1
    for rowid, seq, t, kind, room, actor, subject, detail, leaf, pruned in rows:
        if seq != expected:
            if seq > expected:
                problems.append(f"entries {expected}..{seq - 1} deleted (sequence jumps to {seq})")
            else:
                problems.append(f"entry {seq} out of order or inserted (row {rowid})")
            expected = seq
        stored = bytes(leaf)
        if not pruned:
            actual = leaf_hash(entry_bytes(seq, t, kind, room, actor, subject, detail))
            if actual != stored:
                problems.append(f"entry {seq} modified (its content no longer matches its hash)")
                stored = actual
        leaves.append(stored)
        expected += 1
    return len(rows), leaves


def verify(data_dir: str | Path) -> VerifyReport:
    """Recompute every leaf and signed root; report each discrepancy found."""
    data_dir = Path(data_dir)
    db = _open_readonly(data_dir)
    pub = _public_key(data_dir)
    problems: list[str] = []
    count, leaves = _recompute(db, problems)
    heads = db.execute(
        "SELECT size, time_ms, root, signature FROM tree_heads ORDER BY size"
    ).fetchall()
    signed = 0
    prev: tuple[int, bytes] | None = None
    for size, time_ms, root, sig in heads:
        root = bytes(root)
        try:
            pub.verify(bytes(sig), tree_head_message(size, time_ms, root))
        except InvalidSignature:
            problems.append(f"tree head of size {size} has a bad signature")
            continue
        if size > len(leaves):
            problems.append(f"signed tree of size {size} but only {len(leaves)} entries: deleted")
        elif tree_root(leaves[:size]) != root:
            problems.append(
                f"entries up to {size} do not match their signed root (modified, inserted, "
                "deleted or reordered)"
            )
        if prev is not None and size <= len(leaves):
            proof = consistency_proof(prev[0], leaves[:size])
            if not verify_consistency(prev[0], size, proof, prev[1], root):
                problems.append(f"tree heads {prev[0]} and {size} are not consistent")
        prev = (size, root)
        signed = max(signed, size)
    db.close()
    return VerifyReport(count, signed, problems)


def prove(data_dir: str | Path, seq: int) -> dict[str, Any]:
    """Inclusion proof of entry ``seq`` in the latest signed tree, checked before returning."""
    data_dir = Path(data_dir)
    db = _open_readonly(data_dir)
    head = db.execute(
        "SELECT size, time_ms, root, signature FROM tree_heads ORDER BY size DESC LIMIT 1"
    ).fetchone()
    if head is None:
        raise ValueError("no signed tree head yet")
    size, time_ms, root, sig = head
    if not 1 <= seq <= size:
        raise ValueError(f"entry {seq} is not in the signed tree of size {size}")
    leaves = [
        bytes(r[0]) for r in db.execute("SELECT leaf FROM entries ORDER BY seq LIMIT ?", (size,))
    ]
    entry = db.execute(
        "SELECT time, kind, room, actor, subject, detail FROM entries WHERE seq = ?", (seq,)
    ).fetchone()
    db.close()
    proof = inclusion_proof(seq - 1, leaves)
    ok = verify_inclusion(leaves[seq - 1], seq - 1, size, proof, bytes(root))
    return {
        "entry": seq,
        "content": dict(
            zip(("time", "kind", "room", "actor", "subject", "detail"), entry, strict=True)
        ),
        "leaf_hash": leaves[seq - 1].hex(),
        "tree_size": size,
        "tree_time_ms": time_ms,
        "root": bytes(root).hex(),
        "signature": bytes(sig).hex(),
        "path": [p.hex() for p in proof],
        "verified": ok,
    }


# --------------------------------------------------------------------------- saved heads

#: Fields of a saved tree head (what ``GET /admin/audit/head`` and ``medverse audit head`` give).
HEAD_FIELDS = ("size", "time_ms", "root", "signature", "public_key")


def _raw_public_key(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def current_head(data_dir: str | Path) -> dict[str, Any]:
    """The newest signed tree head of the log in ``data_dir`` and the key that verifies it
    (hex), as the admin API publishes it: keep it somewhere the server cannot write, and
    :func:`check_against` proves later that the log still begins with what it covered.
    Read-only (a running server signs a head within a second of each change); ValueError if
    there is none or its signature does not verify."""
    data_dir = Path(data_dir)
    db = _open_readonly(data_dir)
    try:
        row = db.execute(
            "SELECT size, time_ms, root, signature FROM tree_heads ORDER BY size DESC LIMIT 1"
        ).fetchone()
    finally:
        db.close()
    if row is None:
        raise ValueError(f"the audit log in {data_dir.resolve()} has no signed tree head yet")
    size, time_ms, root, sig = row
    pub = _public_key(data_dir)
    try:
        pub.verify(bytes(sig), tree_head_message(size, time_ms, bytes(root)))
    except InvalidSignature:
        raise ValueError(f"the newest tree head (size {size}) has a bad signature") from None
    return {
        "size": size,
        "time_ms": time_ms,
        "root": bytes(root).hex(),
        "signature": bytes(sig).hex(),
        "public_key": _raw_public_key(pub).hex(),
    }


@dataclass(frozen=True)
class SavedHead:
    """A signed tree head kept elsewhere: ``size`` entries had root ``root`` at ``time_ms``."""

    size: int
    time_ms: int
    root: bytes
    signature: bytes
    public_key: bytes

    @classmethod
    def parse(cls, obj: object) -> SavedHead:
        """From the JSON object :func:`current_head` (or the admin API) gives; ValueError if
        it is not one."""
        if not isinstance(obj, dict) or any(k not in obj for k in HEAD_FIELDS):
            raise ValueError(f"not a saved tree head (a JSON object with {', '.join(HEAD_FIELDS)})")
        size, time_ms = obj["size"], obj["time_ms"]
        if not isinstance(size, int) or not isinstance(time_ms, int) or size < 1 or time_ms < 0:
            raise ValueError("a saved tree head's size and time_ms are positive integers")
        try:
            root, sig, key = (bytes.fromhex(obj[k]) for k in ("root", "signature", "public_key"))
        except (TypeError, ValueError):
            raise ValueError("a saved tree head's root, signature and public_key are hex") from None
        if len(root) != 32 or len(key) != 32:
            raise ValueError("a saved tree head's root and public_key are 32 bytes each")
        return cls(size, time_ms, root, sig, key)

    def when(self) -> str:
        """When it was signed, in UTC."""
        return _utc(self.time_ms / 1000)


def check_against(data_dir: str | Path, head: SavedHead) -> str | None:
    """Whether the log in ``data_dir`` is an extension of the log ``head`` was signed for
    (RFC 6962/9162 consistency between that head and the log's newest signed head): None if
    so, else one line saying what went wrong. Detects truncation, a different history (fork)
    and the database rolled back to a copy older than the head, none of which the log alone
    can show (whoever rewrites it can delete or re-sign its own heads too)."""
    data_dir = Path(data_dir)
    pub = _public_key(data_dir)
    if _raw_public_key(pub) != head.public_key:
        return (
            "the saved head was signed with another key than this log's "
            f"({PUBLIC_KEY_FILE} was replaced, or this is another log)"
        )
    try:
        Ed25519PublicKey.from_public_bytes(head.public_key).verify(
            head.signature, tree_head_message(head.size, head.time_ms, head.root)
        )
    except InvalidSignature:
        return "the saved head's signature does not verify (the saved file was altered)"
    db = _open_readonly(data_dir)
    try:
        _, leaves = _recompute(db, [])
    finally:
        db.close()
    m, n = head.size, len(leaves)
    if n < m:
        return (
            f"the log holds {n} entries but the head saved at {head.when()} covered {m}: "
            "entries were deleted from its end (truncated), or the database was rolled back to "
            "an earlier copy"
        )
    # The consistency proof from the saved head to the log as it is now (its signed heads are
    # checked against the same leaves by verify()): built from this log's leaves, it
    # reconstructs the saved root only if the first m entries are those the head covered.
    if n == m:
        ok = tree_root(leaves) == head.root
    else:
        proof = consistency_proof(m, leaves)
        ok = verify_consistency(m, n, proof, head.root, tree_root(leaves))
    if not ok:
        return (
            f"the first {m} entries are not those the head saved at {head.when()} covered: the "
            "history was rewritten (a fork), or the database was rolled back to an earlier copy "
            "and written to since"
        )
    return None


# --------------------------------------------------------------------------- reading


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _field(value: object) -> str:
    """A value on one line: plain if it is a simple word, else JSON-quoted (so names or
    reasons with spaces, quotes or line breaks cannot break or forge a line)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if text and all(c.isprintable() and not c.isspace() and c not in "\"'=" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def read_entries(
    data_dir: str | Path,
    since: float | None = None,
    room: str | None = None,
    identity: str | None = None,
) -> list[str]:
    """The log's entries as lines for people, oldest first: sequence number, UTC time, kind,
    room, actor, subject and details. ``since`` (Unix time), ``room`` and ``identity`` (the
    actor or subject) select entries. The log holds no pose, audio or annotation content, so
    neither do these lines; entries past retention show as pruned."""
    db = _open_readonly(Path(data_dir))
    where: list[str] = ["1"]
    args: list[object] = []
    if since is not None:
        where.append("time >= ?")
        args.append(since)
    if room is not None:
        where.append("room = ?")
        args.append(room)
    if identity is not None:
        where.append("(actor = ? OR subject = ?)")
        args += [identity, identity]
    try:
        rows = db.execute(
            "SELECT seq, time, kind, room, actor, subject, detail, pruned FROM entries WHERE "
            + " AND ".join(where)
            + " ORDER BY seq",
            args,
        ).fetchall()
    finally:
        db.close()
    lines = []
    for seq, t, kind, room_, actor, subject, detail, pruned in rows:
        parts = [f"{seq:>6}", _utc(t), _field(kind)]
        if pruned:
            parts.append("(content pruned after the retention period)")
        for name, value in (("room", room_), ("actor", actor), ("subject", subject)):
            if value is not None:
                parts.append(f"{name}={_field(value)}")
        try:
            details = json.loads(detail) if detail else {}
        except ValueError:
            details = {"detail": detail}
        if not isinstance(details, dict):
            details = {"detail": details}
        parts += [f"{_field(k)}={_field(v)}" for k, v in details.items()]
        lines.append("  ".join(parts[:3]) + ("  " + " ".join(parts[3:]) if parts[3:] else ""))
    return lines
