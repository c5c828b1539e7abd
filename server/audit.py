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
import contextlib
import functools
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
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

    def to_bytes(self) -> bytes:
        """The peaks as bytes (height, then hash, each), to store beside the log's size."""
        return b"".join(bytes([h]) + digest for h, digest in self._peaks)

    @classmethod
    def from_bytes(cls, data: bytes) -> Frontier:
        """A frontier from :meth:`to_bytes`."""
        f = cls()
        f._peaks = [(data[i], bytes(data[i + 1 : i + 33])) for i in range(0, len(data), 33)]
        return f

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
    """The signing key in ``data_dir``, made on first use. Servers of a cluster share one key
    (their data directory is on a shared volume, or holds a copy): two starting at once on an
    empty directory agree on one key, since it appears under its name complete or not at
    all (written aside, then linked, which fails if the other was first)."""
    path = data_dir / KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another server made it first: use that one
        finally:
            tmp.unlink()
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path = data_dir / PUBLIC_KEY_FILE
    if not pub_path.exists():  # written once, beside the key (never overwritten)
        tmp = data_dir / f".{PUBLIC_KEY_FILE}.{os.getpid()}.tmp"
        tmp.write_bytes(public)
        os.replace(tmp, pub_path)
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
        # Only the tree's frontier (one hash per perfect subtree) is kept: the leaves are in
        # the file, and keeping them in memory too grew the server by every entry it wrote.
        self._frontier = Frontier()
        self._size = 0
        for (leaf,) in self._db.execute("SELECT leaf FROM entries ORDER BY seq"):
            self._frontier.push(bytes(leaf))
            self._size += 1
        self._sign_timer: asyncio.TimerHandle | None = None
        self._signed_size = self._db.execute(
            "SELECT COALESCE(MAX(size), 0) FROM tree_heads"
        ).fetchone()[0]
        if retention_days > 0:
            self.prune()

    @property
    def size(self) -> int:
        return self._size

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
        seq = self._size + 1
        t = time.time()
        det = json.dumps(detail, separators=(",", ":"), sort_keys=True) if detail else None
        leaf = leaf_hash(entry_bytes(seq, t, kind, room, actor, subject, det))
        self._db.execute(
            "INSERT INTO entries (seq, time, kind, room, actor, subject, detail, leaf) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, round(t, 6), kind, room, actor, subject, det, leaf),
        )
        self._size = seq
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
        size = self._size
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

    async def signed_head_async(self) -> dict[str, Any] | None:
        """:meth:`signed_head` (SQLite answers at once, on the event loop)."""
        return self.signed_head()

    async def proof_async(self, seq: int) -> dict[str, Any]:
        """An inclusion proof of entry ``seq`` in a freshly signed head."""
        self.sign()
        return prove(self.data_dir, seq)

    def source(self) -> AuditSource:
        """The log, to read."""
        return SQLiteAuditSource(self.data_dir)

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


#: Entries written to PostgreSQL in one transaction at most.
PG_BATCH = 1000


class PostgresAuditLog:
    """The audit log of a cluster in PostgreSQL: one Merkle tree whichever server appends.

    :meth:`append` only queues (the event loop never waits for the database); a writer thread
    of its own writes the queue in batches, in order. Each batch locks the log's head row
    (``audit_state``: size and the roots of the tree's perfect subtrees), numbers its entries
    after the size it finds there, hashes them into the tree and stores the new head in the
    same transaction, so entries of several servers interleave into one sequence with no gap
    or duplicate. Each entry carries a unique id: a batch retried after a commit whose answer
    was lost skips the entries already in. Tree heads are signed at most ``sign_delay``
    seconds after a change, with the key every server of the cluster shares (see
    :func:`_load_key`); the first server registers its public key in the database and a server
    with another key refuses to start."""

    def __init__(
        self,
        db: Any,
        data_dir: str | Path,
        retention_days: float = 0.0,
        sign_delay: float = 0.5,
    ) -> None:
        self.db = db
        self.data_dir = Path(data_dir)
        self.retention_days = retention_days
        self.sign_delay = sign_delay
        self._key = _load_key(self.data_dir)
        self._public = _raw_public_key(self._key.public_key())
        self._register_key()
        self._node = uuid.uuid4().hex
        self._count = 0
        self._cond = threading.Condition()
        self._queue: list[tuple[Any, ...]] = []
        self._queued = 0  # entries ever queued by this server
        self._written = 0  # of those, entries committed
        self._size = 0  # the cluster log's size after this server's last write
        self._sign_at: float | None = None  # when the next head is due (monotonic)
        self._stopping = False
        # Event-loop futures waiting for entries up to a mark to be committed.
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        if retention_days > 0:
            self.prune()
        self._thread = threading.Thread(target=self._run, name="medverse-audit", daemon=True)
        self._thread.start()

    def _register_key(self) -> None:
        public = self._public

        async def register(conn: Any) -> bytes:
            row = await conn.fetchrow("SELECT public_key FROM audit_state WHERE id = 1 FOR UPDATE")
            if row["public_key"] is None:
                await conn.execute("UPDATE audit_state SET public_key = $1 WHERE id = 1", public)
                return public
            return bytes(row["public_key"])

        registered = self.db.transaction(register)
        if registered != public:
            raise ValueError(
                f"the audit signing key in {self.data_dir.resolve() / KEY_FILE} is not the one "
                f"the audit log in {self.db.where} is signed with: every server of a cluster "
                "needs the same key (keep the data directory on the shared volume, or copy "
                f"{KEY_FILE} and {PUBLIC_KEY_FILE} from the first server)"
            )

    @property
    def size(self) -> int:
        """Entries in the cluster's log, as of this server's last write."""
        return self._size

    def append(
        self,
        kind: str,
        *,
        room: str | None = None,
        actor: str | None = None,
        subject: str | None = None,
        **detail: Any,
    ) -> None:
        """Queue one event; it is committed within milliseconds, in order (its sequence number
        is given by the database then)."""
        det = json.dumps(detail, separators=(",", ":"), sort_keys=True) if detail else None
        with self._cond:
            self._count += 1
            uid = f"{self._node}:{self._count}"
            self._queue.append((uid, time.time(), kind, room, actor, subject, det))
            self._queued += 1
            self._cond.notify_all()

    # ----------------------------------------------------------------- the writer

    def _run(self) -> None:
        log = logging.getLogger("medverse.audit")
        while True:
            with self._cond:
                while not self._queue and not self._stopping and not self._sign_due():
                    wait = None
                    if self._sign_at is not None:
                        wait = max(0.0, self._sign_at - time.monotonic())
                    self._cond.wait(wait)
                batch = self._queue[:PG_BATCH]
                stopping = self._stopping
            if batch:
                try:
                    self._size = self.db.transaction(functools.partial(self._write, batch=batch))
                except Exception:
                    log.exception("%d audit entries could not be written yet", len(batch))
                    if stopping:
                        with self._cond:  # given up: the server stops
                            self._queue.clear()
                            self._written = self._queued
                            self._cond.notify_all()
                            self._wake_waiters()
                        return
                    time.sleep(1.0)
                    continue
                with self._cond:
                    del self._queue[: len(batch)]  # only this thread removes
                    self._written += len(batch)
                    self._cond.notify_all()
                    self._wake_waiters()
                    if self._sign_at is None:
                        self._sign_at = time.monotonic() + self.sign_delay
            if self._sign_due():
                try:
                    self._sign_now()
                except Exception:
                    log.exception("signing the audit log's tree head failed")
                    self._sign_at = time.monotonic() + 1.0
            with self._cond:
                if stopping and not self._queue:
                    return

    def _wake_waiters(self) -> None:
        # Called with the condition held, on the writer thread.
        done = [w for w in self._waiters if w[0] <= self._written]
        if done:
            self._waiters = [w for w in self._waiters if w[0] > self._written]
        for _, loop, fut in done:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, fut)

    def mark(self) -> int:
        """How many entries this server has queued so far (for :meth:`written`)."""
        with self._cond:
            return self._queued

    def written(self, mark: int) -> asyncio.Future[None]:
        """A future of the running loop, done once every entry up to ``mark`` is committed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._written >= mark:
                fut.set_result(None)
            else:
                self._waiters.append((mark, loop, fut))
        return fut

    def _sign_due(self) -> bool:
        return self._sign_at is not None and time.monotonic() >= self._sign_at

    async def _write(self, conn: Any, *, batch: list[tuple[Any, ...]]) -> int:
        # As the SQLite log (synchronous=NORMAL): committed at once for every reader, flushed
        # to disk by PostgreSQL's WAL writer within a fraction of a second rather than
        # waiting for a flush of its own, which objects' commits (acknowledged ones) need.
        await conn.execute("SET LOCAL synchronous_commit = off")
        # The row lock orders appenders of every server: sequence numbers come from here.
        size, peaks = await conn.fetchrow(
            "SELECT size, peaks FROM audit_state WHERE id = 1 FOR UPDATE"
        )
        done = {
            r[0]
            for r in await conn.fetch(
                "SELECT uid FROM audit_entries WHERE uid = ANY($1::text[])", [b[0] for b in batch]
            )
        }
        frontier = Frontier.from_bytes(bytes(peaks))
        records = []
        for uid, t, kind, room, actor, subject, det in batch:
            if uid in done:
                continue  # committed by an attempt whose answer was lost
            size += 1
            leaf = leaf_hash(entry_bytes(size, t, kind, room, actor, subject, det))
            frontier.push(leaf)
            records.append((size, uid, round(t, 6), kind, room, actor, subject, det, leaf, 0))
        if records:
            await conn.copy_records_to_table(
                "audit_entries",
                records=records,
                columns=[
                    "seq", "uid", "time", "kind", "room", "actor", "subject", "detail", "leaf",
                    "pruned",
                ],
            )  # fmt: skip
            await conn.execute(
                "UPDATE audit_state SET size = $1, peaks = $2 WHERE id = 1",
                size,
                frontier.to_bytes(),
            )
        return int(size)

    def _sign_now(self) -> None:
        self._sign_at = None

        async def sign(conn: Any) -> None:
            size, peaks = await conn.fetchrow("SELECT size, peaks FROM audit_state WHERE id = 1")
            if size == 0 or await conn.fetchval(
                "SELECT 1 FROM audit_tree_heads WHERE size = $1", size
            ):
                return
            root = Frontier.from_bytes(bytes(peaks)).root()
            time_ms = int(time.time() * 1000)
            sig = self._key.sign(tree_head_message(size, time_ms, root))
            # Another server may sign the same size at the same moment: either head is good.
            await conn.execute(
                "INSERT INTO audit_tree_heads (size, time_ms, root, signature) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (size) DO NOTHING",
                size,
                time_ms,
                root,
                sig,
            )

        self.db.run(sign)

    # ----------------------------------------------------------------- blocking calls

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued so far is committed (blocking); False on timeout."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._written >= target, timeout)

    def sign(self) -> None:
        """Commit what is queued and sign the tree head of the whole log now (blocking)."""
        self.flush()
        self._sign_now()

    def signed_head(self) -> dict[str, Any] | None:
        """The newest signed tree head, with the public key that verifies it (hex); blocking."""
        self.sign()
        heads = PostgresAuditSource(self.db, self.data_dir).heads()
        if not heads:
            return None
        size, time_ms, root, sig = heads[-1]
        return {
            "size": size,
            "time_ms": time_ms,
            "root": root.hex(),
            "signature": sig.hex(),
            "public_key": self._public.hex(),
        }

    async def signed_head_async(self) -> dict[str, Any] | None:
        """:meth:`signed_head` in a thread (for the event loop)."""
        return await asyncio.to_thread(self.signed_head)

    async def proof_async(self, seq: int) -> dict[str, Any]:
        """An inclusion proof of entry ``seq`` in a freshly signed head, in a thread."""

        def proof() -> dict[str, Any]:
            self.sign()
            return prove(PostgresAuditSource(self.db, self.data_dir), seq)

        return await asyncio.to_thread(proof)

    def source(self) -> AuditSource:
        """The log, to read (a snapshot taken at first read)."""
        return PostgresAuditSource(self.db, self.data_dir)

    def prune(self) -> int:
        """Drop the content of entries past the retention period, keeping their leaf hashes."""
        cutoff = time.time() - self.retention_days * 86400

        async def prune(conn: Any) -> int:
            done = await conn.execute(
                "UPDATE audit_entries SET room = NULL, actor = NULL, subject = NULL, "
                "detail = NULL, pruned = 1 WHERE time < $1 AND pruned = 0",
                cutoff,
            )
            return int(done.split()[-1])

        return self.db.run(prune)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Commit what is queued, sign the last head and stop the writer (blocking)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        try:
            self._sign_now()
        except Exception:
            logging.getLogger("medverse.audit").exception("signing the last tree head failed")


# --------------------------------------------------------------------------- verification


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AuditRecorder:
    """Where the server's parts record security-relevant events: appends to the audit log once
    it is open (``log``), and never lets a failing append break a session or a room."""

    def __init__(self) -> None:
        self._log: AuditLog | PostgresAuditLog | None = None

    @property
    def log(self) -> AuditLog | PostgresAuditLog | None:
        """The open log (None before :meth:`open` and after :meth:`close`)."""
        return self._log

    def open(
        self,
        data_dir: str | Path,
        retention_days: float = 0.0,
        database: Any = None,
        **fields: Any,
    ) -> None:
        """Open the log (in ``data_dir``, or the cluster's in ``database``, a
        :class:`~.pg.Database`) and record the server's start (with ``fields``)."""
        if database is not None:
            self._log = PostgresAuditLog(database, data_dir, retention_days=retention_days)
        else:
            self._log = AuditLog(data_dir, retention_days=retention_days)
        self._log.append("server_start", **fields)

    def source(self) -> AuditSource | None:
        """The open log, to read (None if it is not open)."""
        return self._log.source() if self._log is not None else None

    def close(self) -> None:
        """Record the server's stop and close the log."""
        if self._log is not None:
            self._log.append("server_stop")
            self._log.close()
            self._log = None

    def mark(self) -> int | None:
        """A mark of the entries queued so far, when entries are committed after
        :meth:`__call__` returns (the cluster's PostgreSQL log); None when each is committed
        as it is appended (the SQLite log) or there is no log."""
        log = self._log
        return log.mark() if isinstance(log, PostgresAuditLog) else None

    async def written(self, mark: int, timeout: float) -> bool:
        """Wait until every entry up to ``mark`` is committed; False after ``timeout``
        seconds (the database is out of reach: the entries stay queued and go in once it is
        back)."""
        log = self._log
        if not isinstance(log, PostgresAuditLog):
            return True
        try:
            await asyncio.wait_for(log.written(mark), timeout)
        except TimeoutError:
            return False
        return True

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


class AuditSource(ABC):
    """One audit log, read for verification, proofs and reading: the SQLite file of a data
    directory (:class:`SQLiteAuditSource`) or a cluster's PostgreSQL database
    (:class:`PostgresAuditSource`). The functions below take a source or a data directory."""

    #: Where the log is, for messages.
    where: str = ""

    @abstractmethod
    def rows(self) -> list[tuple[Any, ...]]:
        """Every entry as stored, in storage order: (position, seq, time, kind, room, actor,
        subject, detail, leaf, pruned)."""

    @abstractmethod
    def heads(self) -> list[tuple[int, int, bytes, bytes]]:
        """The signed tree heads (size, time_ms, root, signature), smallest first."""

    @abstractmethod
    def public_key(self) -> Ed25519PublicKey:
        """The key the log's heads are signed with."""

    def object_entries(self, kinds: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """(kind, room, subject, detail) of the unpruned entries of these kinds that name a
        room, in sequence order."""
        return [
            (r[3], r[4], r[6], r[7])
            for r in sorted(self.rows(), key=lambda r: r[1])
            if not r[9] and r[4] is not None and r[3] in kinds
        ]

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to let go of
        """Let go of the storage (the source reads nothing more)."""


def _key_file(data_dir: Path) -> Ed25519PublicKey:
    pub = serialization.load_pem_public_key((data_dir / PUBLIC_KEY_FILE).read_bytes())
    if not isinstance(pub, Ed25519PublicKey):
        raise ValueError(f"{data_dir / PUBLIC_KEY_FILE} is not an Ed25519 public key")
    return pub


class SQLiteAuditSource(AuditSource):
    """The audit log in a data directory's SQLite file, opened read-only; ValueError naming
    what is missing."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"no data directory {data_dir.resolve()}")
        if not (data_dir / DB_FILE).is_file():
            raise ValueError(f"no audit log in {data_dir.resolve()} ({DB_FILE} is missing)")
        self.where = str(data_dir.resolve() / DB_FILE)
        self._db = sqlite3.connect(f"file:{data_dir / DB_FILE}?mode=ro", uri=True)

    def rows(self) -> list[tuple[Any, ...]]:
        return self._db.execute(
            "SELECT rowid, seq, time, kind, room, actor, subject, detail, leaf, pruned "
            "FROM entries ORDER BY rowid"
        ).fetchall()

    def heads(self) -> list[tuple[int, int, bytes, bytes]]:
        return [
            (size, time_ms, bytes(root), bytes(sig))
            for size, time_ms, root, sig in self._db.execute(
                "SELECT size, time_ms, root, signature FROM tree_heads ORDER BY size"
            )
        ]

    def public_key(self) -> Ed25519PublicKey:
        return _key_file(self.data_dir)

    def object_entries(self, kinds: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return self._db.execute(
            "SELECT kind, room, subject, detail FROM entries WHERE pruned = 0 AND room IS NOT NULL "
            f"AND kind IN ({', '.join('?' * len(kinds))}) ORDER BY seq",
            kinds,
        ).fetchall()

    def close(self) -> None:
        self._db.close()


class PostgresAuditSource(AuditSource):
    """A cluster's audit log in PostgreSQL, read in one snapshot (entries and heads of the
    same moment, however many servers append meanwhile). The public key is the data
    directory's ``audit_public_key.pem`` where there is one, else the one the servers
    registered in the database (anchor heads elsewhere, ``medverse audit head``, and check
    with ``--against``: whoever can rewrite the database can replace that one too)."""

    def __init__(self, db: Any, data_dir: str | Path | None = None) -> None:
        self.db = db
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.where = db.where
        self._snapshot: tuple[list[tuple[Any, ...]], list[Any], bytes | None] | None = None

    def _load(self) -> tuple[list[tuple[Any, ...]], list[Any], bytes | None]:
        if self._snapshot is None:

            async def read(conn: Any) -> tuple[list[tuple[Any, ...]], list[Any], bytes | None]:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    rows = await conn.fetch(
                        "SELECT seq, seq, time, kind, room, actor, subject, detail, leaf, pruned "
                        "FROM audit_entries ORDER BY seq"
                    )
                    heads = await conn.fetch(
                        "SELECT size, time_ms, root, signature FROM audit_tree_heads ORDER BY size"
                    )
                    key = await conn.fetchval("SELECT public_key FROM audit_state WHERE id = 1")
                return [tuple(r) for r in rows], [tuple(h) for h in heads], key

            self._snapshot = self.db.run(read)
        return self._snapshot

    def rows(self) -> list[tuple[Any, ...]]:
        return self._load()[0]

    def heads(self) -> list[tuple[int, int, bytes, bytes]]:
        return [(s, t, bytes(r), bytes(g)) for s, t, r, g in self._load()[1]]

    def public_key(self) -> Ed25519PublicKey:
        if self.data_dir is not None and (self.data_dir / PUBLIC_KEY_FILE).is_file():
            return _key_file(self.data_dir)
        key = self._load()[2]
        if key is None:
            raise ValueError(f"no server has written to the audit log in {self.where} yet")
        return Ed25519PublicKey.from_public_bytes(bytes(key))


@contextlib.contextmanager
def _opened(source: str | Path | AuditSource) -> Iterator[AuditSource]:
    """``source`` itself, or the SQLite log of that data directory (closed afterwards)."""
    if isinstance(source, AuditSource):
        yield source
        return
    own = SQLiteAuditSource(source)
    try:
        yield own
    finally:
        own.close()


def _recompute(src: AuditSource, problems: list[str]) -> tuple[int, list[bytes]]:
    """The number of rows and the leaf hash of every entry, recomputed from its content where
    the content is kept (pruned entries keep only their stored hash); discrepancies are added
    to ``problems``."""
    rows = src.rows()
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


def verify(source: str | Path | AuditSource) -> VerifyReport:
    """Recompute every leaf and signed root; report each discrepancy found. ``source``: a
    data directory (its SQLite log) or an :class:`AuditSource`."""
    with _opened(source) as src:
        pub = src.public_key()
        problems: list[str] = []
        count, leaves = _recompute(src, problems)
        heads = src.heads()
    signed = 0
    prev: tuple[int, bytes] | None = None
    for size, time_ms, root, sig in heads:
        try:
            pub.verify(sig, tree_head_message(size, time_ms, root))
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
    return VerifyReport(count, signed, problems)


def prove(source: str | Path | AuditSource, seq: int) -> dict[str, Any]:
    """Inclusion proof of entry ``seq`` in the latest signed tree, checked before returning."""
    with _opened(source) as src:
        heads = src.heads()
        if not heads:
            raise ValueError("no signed tree head yet")
        size, time_ms, root, sig = heads[-1]
        if not 1 <= seq <= size:
            raise ValueError(f"entry {seq} is not in the signed tree of size {size}")
        rows = sorted(src.rows(), key=lambda r: r[1])
    leaves = [bytes(r[8]) for r in rows[:size]]
    entry = next(r for r in rows if r[1] == seq)
    proof = inclusion_proof(seq - 1, leaves)
    ok = verify_inclusion(leaves[seq - 1], seq - 1, size, proof, root)
    return {
        "entry": seq,
        "content": dict(
            zip(("time", "kind", "room", "actor", "subject", "detail"), entry[2:8], strict=True)
        ),
        "leaf_hash": leaves[seq - 1].hex(),
        "tree_size": size,
        "tree_time_ms": time_ms,
        "root": root.hex(),
        "signature": sig.hex(),
        "path": [p.hex() for p in proof],
        "verified": ok,
    }


# --------------------------------------------------------------------------- saved heads

#: Fields of a saved tree head (what ``GET /admin/audit/head`` and ``medverse audit head`` give).
HEAD_FIELDS = ("size", "time_ms", "root", "signature", "public_key")


def _raw_public_key(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def current_head(source: str | Path | AuditSource) -> dict[str, Any]:
    """The newest signed tree head of the log (a data directory's, or an :class:`AuditSource`)
    and the key that verifies it (hex), as the admin API publishes it: keep it somewhere the
    server cannot write, and :func:`check_against` proves later that the log still begins
    with what it covered. Read-only (a running server signs a head within a second of each
    change); ValueError if there is none or its signature does not verify."""
    with _opened(source) as src:
        heads = src.heads()
        if not heads:
            raise ValueError(f"the audit log in {src.where} has no signed tree head yet")
        pub = src.public_key()
    size, time_ms, root, sig = heads[-1]
    try:
        pub.verify(sig, tree_head_message(size, time_ms, root))
    except InvalidSignature:
        raise ValueError(f"the newest tree head (size {size}) has a bad signature") from None
    return {
        "size": size,
        "time_ms": time_ms,
        "root": root.hex(),
        "signature": sig.hex(),
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


def check_against(source: str | Path | AuditSource, head: SavedHead) -> str | None:
    """Whether the log (a data directory's, or an :class:`AuditSource`) is an extension of
    the log ``head`` was signed for (RFC 6962/9162 consistency between that head and the
    log's newest signed head): None if so, else one line saying what went wrong. Detects
    truncation, a different history (fork) and the database rolled back to a copy older than
    the head, none of which the log alone can show (whoever rewrites it can delete or re-sign
    its own heads too)."""
    with _opened(source) as src:
        pub = src.public_key()
        _, leaves = _recompute(src, [])
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
    source: str | Path | AuditSource,
    since: float | None = None,
    room: str | None = None,
    identity: str | None = None,
) -> list[str]:
    """The log's entries as lines for people, oldest first: sequence number, UTC time, kind,
    room, actor, subject and details. ``since`` (Unix time), ``room`` and ``identity`` (the
    actor or subject) select entries. The log holds no pose, audio or annotation content, so
    neither do these lines; entries past retention show as pruned."""
    with _opened(source) as src:
        stored = src.rows()
    rows = sorted(
        ((*r[1:8], r[9]) for r in stored),
        key=lambda r: r[0],
    )
    rows = [
        r
        for r in rows
        if (since is None or r[1] >= since)
        and (room is None or r[3] == room)
        and (identity is None or identity in (r[4], r[5]))
    ]
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
