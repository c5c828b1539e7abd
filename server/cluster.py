"""A cluster of medverse servers (nodes) sharing Redis as their directory of nodes and rooms.

Each node registers itself in Redis with its public URL, capacity and load, and refreshes the
entry with a time to live: a node that dies disappears from the directory within one TTL. A
room lives on exactly one node, recorded in Redis as a *lease* (owner, URL, generation) that
the owner renews; every change of a lease goes through a Lua script that compares the owner
and the generation first (compare-and-set), and every grant of a lease takes a new generation
from a counter that only grows. So:

* a node renews only the lease it was granted (same owner, same generation); once its lease
  expired and another node was granted the room, its renewal fails and it stops serving the
  room at once;
* a node that cannot reach Redis stops serving its rooms when its lease could have expired,
  measured from before it sent the last successful renewal, so it has stopped before Redis
  lets another node take the room, even across a partition;
* the tick loop never waits on Redis: joins wait for at most one round trip (none when the
  node already holds the room's lease), and renewals, load reports and room listings run in
  the background once per heartbeat.

A join that reaches a node that does not run its room is answered with ``redirect`` (the
owner's URL). A new room goes to the node with the most capacity left. Resume tokens are
signed with a secret all nodes share (kept in Redis), so a member resumes on whichever node
runs its room now, keeping its member id. Operators' commands (end a room, ban an identity,
drain a node) are published on one channel that every node listens to.

A host moving a member to a room another node runs: the member's node asks that node, on the
node's own channel (its *inbox*), whether the member may enter now, and answers the host once
it has heard back (or after ``cluster_transfer_timeout``); only an accepted member leaves. The
transfer grant it then carries joins once in the whole cluster: the node it joins sets the
grant's ``jti`` in Redis (``SET NX``) first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis as syncredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from medverse.protocol.errors import ErrorCode, ProtocolError

from .config import ServerConfig
from .roomaccess import TransferGrants, derive_key

log = logging.getLogger("medverse.cluster")

PREFIX = "medverse:"
NODES = PREFIX + "nodes"  # set of node ids (entries whose node hash expired are pruned)
GENERATIONS = PREFIX + "generations"  # hash: room -> last lease generation granted
SECRET = PREFIX + "secret"  # the shared secret resume tokens are signed with
COMMANDS = PREFIX + "commands"  # pub/sub channel of operators' commands


def node_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


def node_rooms_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}:rooms"


def room_key(room: str) -> str:
    return f"{PREFIX}room:{room}"


def inbox(node_id: str) -> str:
    """The pub/sub channel of one node's questions and answers (a move's admission)."""
    return f"{PREFIX}node:{node_id}:inbox"


def grant_key(jti: str) -> str:
    """Set (once, until the grant expires) when a transfer grant is redeemed anywhere."""
    return f"{PREFIX}grant:{jti}"


# Grant the room's lease to the candidate node unless someone holds it; either way return
# the holder, its URL, the generation and the milliseconds left.
_CLAIM = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'url', 'gen')
if cur[1] then
  return {cur[1], cur[2], cur[3], redis.call('PTTL', KEYS[1])}
end
local gen = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'url', ARGV[3], 'gen', gen)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {ARGV[2], ARGV[3], tostring(gen), tonumber(ARGV[4])}
"""

#: Heartbeat intervals without a change of a node's entry after which it counts as gone
#: (before its entry expires): a live node rewrites its entry every interval.
STALE_BEATS = 2

# Renew every lease named whose owner and generation are still ours: 1 renewed, 0 lost.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  local cur = redis.call('HMGET', key, 'owner', 'gen')
  if cur[1] == ARGV[1] and cur[2] == ARGV[i + 2] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# Give the lease up, if it is still ours.
_RELEASE = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'gen')
if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# Hand our lease over to another node under a new generation (a draining node's rooms).
_TRANSFER = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'gen')
if cur[1] ~= ARGV[2] or cur[2] ~= ARGV[3] then
  return 0
end
local gen = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'url', ARGV[5], 'gen', gen)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return gen
"""


class ResumeTokens:
    """Resume tokens any node of the cluster can check: the member id, its pose slots and a
    nonce, signed (HMAC-SHA256, truncated to 128 bits) together with the room name and, on
    servers with join tokens, the member's subject, so a token resumes only that member of
    that room for that identity."""

    _BODY = struct.Struct("<IB8s")

    def __init__(self, secret: bytes, bind_subject: bool) -> None:
        self._secret = secret
        self._bind = bind_subject

    def _mac(self, room: str, subject: str, body: bytes) -> bytes:
        who = subject if self._bind else ""
        msg = b"\x00".join((room.encode(), who.encode(), body))
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:16]

    def issue(self, room: str, member_id: int, subject: str, slots: int) -> str:
        body = self._BODY.pack(member_id, slots, secrets.token_bytes(8))
        return base64.urlsafe_b64encode(body + self._mac(room, subject, body)).decode()

    def check(self, token: str, room: str, subject: str) -> tuple[int, int] | None:
        """(member id, slots) if ``token`` was issued for this room and subject, else None."""
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return None
        if len(raw) != self._BODY.size + 16:
            return None
        body, mac = raw[: self._BODY.size], raw[self._BODY.size :]
        if not hmac.compare_digest(mac, self._mac(room, subject, body)):
            return None
        member_id, slots, _ = self._BODY.unpack(body)
        return member_id, slots


@dataclass(frozen=True, slots=True)
class Route:
    """Where a join for a room goes: here (``local``), to ``url`` (another node owns it), or
    nowhere yet (``moving``: its node died and its lease has not expired)."""

    local: bool
    url: str | None = None
    moving: bool = False
    #: The id of the node at ``url``.
    node: str | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """A node's load as it reports it with each heartbeat."""

    members: int
    rooms: int
    tick_p99_ms: float
    cpu_percent: float


@dataclass
class _Lease:
    gen: int
    #: Monotonic time until which this node may serve the room: measured from before the
    #: request that granted or renewed the lease, a margin short of its time to live.
    until: float


async def _nothing_to_store(room: str) -> None:
    return None


@dataclass
class ClusterHooks:
    """What the cluster asks of its server."""

    #: The node's load now.
    load: Callable[[], Load]
    #: What operators see of this node's rooms (``GET /admin/rooms``).
    describe: Callable[[], list[dict[str, object]]]
    #: Stop serving a room now (its lease is lost, or handed to the node at URL).
    drop_room: Callable[[str, str | None], None]
    #: Commands from operators: ``end``, ``ban``; ``drain`` is handled here.
    command: Callable[[dict[str, Any]], None]
    #: Names of the rooms this node runs now.
    rooms: Callable[[], Sequence[str]]
    #: Called once this node has drained (its rooms are elsewhere): the process may exit.
    drained: Callable[[], None] = lambda: None
    #: Store what a room has not stored yet and wait for it (before its lease is handed over).
    persist_room: Callable[[str], Awaitable[None]] = _nothing_to_store
    #: Whether the member a transfer grant names may enter the room now (another node moves
    #: it here): None, or the typed refusal (``room_locked``, ``banned``, ``room_full``, ...).
    admission: Callable[[str, str], ProtocolError | None] = lambda grant, room: ProtocolError(
        ErrorCode.NOT_FOUND, "this server takes no moved members"
    )


@dataclass
class Stats:
    """Redis round trips this node made, by purpose (the benchmark reads them)."""

    joins: int = 0  # joins that asked Redis (a join to a room already held asks nothing)
    leases_lost: int = 0  # rooms this node stopped serving because their lease ran out or moved
    join_round_trips: int = 0
    background_round_trips: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Cluster:
    """This node's membership in the cluster."""

    def __init__(self, config: ServerConfig, node_id: str | None = None) -> None:
        self.config = config
        self.url = config.public_url or f"ws://{_url_host(config.host)}:{config.port}/ws"
        self.node_id = node_id or f"{socket.gethostname()}-{config.port}-{secrets.token_hex(3)}"
        self.ttl = config.cluster_lease_ttl
        #: Seconds between heartbeats and lease renewals: five per time to live, so a busy
        #: machine's slow answers (or a lost one, retried at once) do not cost a lease.
        self.interval = self.ttl / 5.0
        # A lease is served until a margin before Redis could let it go, whatever the clocks.
        self._margin = min(0.5, self.ttl / 6.0)
        # A call waits at most half a lease: long enough for a busy Redis, short enough to try
        # again before the lease could run out (which the watchdog enforces either way).
        self.redis = aioredis.Redis.from_url(
            config.redis_url, socket_timeout=self.ttl / 2, socket_connect_timeout=self.ttl / 2
        )
        # Pub/sub waits for messages for as long as it likes: a connection of its own.
        self._sub_redis = aioredis.Redis.from_url(config.redis_url)
        # Renewals and heartbeats: a blocking client on a thread of their own.
        self._sync = syncredis.Redis.from_url(
            config.redis_url, socket_timeout=self.ttl / 2, socket_connect_timeout=self.ttl / 2
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._report: tuple[dict[str, str], str] = ({}, "[]")
        self.leases: dict[str, _Lease] = {}
        self.draining = False
        self.stats = Stats()
        self.tokens: ResumeTokens | None = None
        #: Transfer grants (a member moved to a room another node runs), once started.
        self.grants: TransferGrants | None = None
        #: A room access credential key every node derives alike (``server/roomaccess.py``).
        self.access_key: bytes | None = None
        self._hooks: ClusterHooks | None = None
        self._nodes: dict[str, dict[str, str]] = {}  # the live nodes as last read
        self._seen: set[str] = set()  # every node seen alive
        self._beats = 0  # this node's heartbeats so far (in its entry, as "beat")
        #: Each other node's last "beat" and when (monotonic, here) it was seen to change.
        self._beat_seen: dict[str, tuple[str, float]] = {}
        #: Nodes whose entry has not changed for STALE_BEATS heartbeats: killed moments ago
        #: (their entry outlives them by up to a lease time). No new rooms go there, and a
        #: join for a room they hold waits for its lease (room_moving) rather than being
        #: sent to them.
        self._stale: frozenset[str] = frozenset()
        self._pending: dict[str, int] = {}  # rooms placed on a node since the last read
        self._tasks: list[asyncio.Task[None]] = []
        self._cpu = (time.monotonic(), time.process_time())
        self._cpu_percent = 0.0
        self._started = False
        #: Admission questions this node asked other nodes, by id, awaiting their answers.
        self._asks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._replies: set[asyncio.Task[None]] = set()
        #: Seconds a move waits for the target node's answer.
        self.transfer_timeout = config.cluster_transfer_timeout

    # ----------------------------------------------------------------- lifecycle

    async def start(self, hooks: ClusterHooks, bind_subject: bool) -> None:
        """Register this node, read the shared resume secret, start listening for commands
        and heartbeats. Raises ``ConnectionError`` (one line) if Redis does not answer."""
        self._hooks = hooks
        try:
            await self.redis.set(SECRET, secrets.token_hex(32), nx=True)
            secret = await self.redis.get(SECRET)
            self._count("start", 2, background=True)
            self._report = self._make_report()
            await asyncio.to_thread(self._heartbeat_sync)
        except (RedisError, OSError) as exc:
            await self._close_clients()
            raise ConnectionError(f"redis_url {self.config.redis_url}: {exc}") from None
        self.tokens = ResumeTokens(bytes.fromhex(secret.decode()), bind_subject)
        self.grants = TransferGrants(bytes.fromhex(secret.decode()))
        self.access_key = derive_key(bytes.fromhex(secret.decode()))
        pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(COMMANDS, inbox(self.node_id))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watchdog(), name="medverse-cluster-watchdog"),
            loop.create_task(self._listen(pubsub), name="medverse-cluster-commands"),
        ]
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._background, args=(loop,), name="medverse-cluster", daemon=True
        )
        self._thread.start()
        self._started = True
        log.info(
            "node %s joined the cluster at %s as %s", self.node_id, _safe(self.config), self.url
        )

    async def stop(self) -> None:
        """Leave the cluster: give up every lease (other nodes take the rooms at once) and
        remove this node from the directory."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.ttl)
            self._thread = None
        if self._started:
            with contextlib.suppress(RedisError, OSError):
                for room in list(self.leases):
                    await self.release(room)
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.delete(node_key(self.node_id), node_rooms_key(self.node_id))
                    pipe.srem(NODES, self.node_id)
                    await pipe.execute()
        self._started = False
        await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self.redis, self._sub_redis):
            with contextlib.suppress(Exception):
                await client.aclose()
        with contextlib.suppress(Exception):
            self._sync.close()

    def _count(self, kind: str, n: int = 1, background: bool = False) -> None:
        s = self.stats
        s.by_kind[kind] = s.by_kind.get(kind, 0) + n
        if background:
            s.background_round_trips += n
        else:
            s.join_round_trips += n

    # ----------------------------------------------------------------- placement

    def holds(self, room: str) -> bool:
        """Whether this node may serve ``room`` now (it holds an unexpired lease)."""
        lease = self.leases.get(room)
        return lease is not None and lease.until > time.monotonic()

    def generation(self, room: str) -> int:
        lease = self.leases.get(room)
        return lease.gen if lease is not None else 0

    async def route(self, room: str) -> Route:
        """Where a join for ``room`` goes. No round trip when this node holds the room; else
        one: the lease is read, or granted to the node with the most room left."""
        if self.holds(room):
            return Route(True)
        candidate, url = self._candidate()
        self.stats.joins += 1
        sent = time.monotonic()
        owner, owner_url, gen, pttl = await self._claim(room, candidate, url)
        self._count("claim")
        if owner == candidate:
            # Until the next heartbeat reads the loads again, count the room as placed there.
            self._pending[owner] = self._pending.get(owner, 0) + 1
        if owner == self.node_id:
            if self.draining:
                # Granted to us before we started draining, and nobody here yet: let it go,
                # so the join goes where rooms are placed now.
                await self.release_lease(room, gen)
                return Route(False, moving=True)
            until = sent + pttl / 1000.0 - self._margin
            held = self.leases.get(room)
            if held is not None and held.gen == gen:  # joins racing for one new room
                held.until = max(held.until, until)
            else:
                self.leases[room] = _Lease(gen, until)
            return Route(True)
        if owner in self._seen and (owner not in self._nodes or owner in self._stale):
            # Its node stopped heartbeating: the room waits for its lease to expire.
            return Route(False, moving=True)
        return Route(False, url=owner_url, node=owner)

    async def _claim(self, room: str, candidate: str, url: str) -> tuple[str, str, int, int]:
        raw = await self.redis.eval(
            _CLAIM,
            2,
            room_key(room),
            GENERATIONS,
            room,
            candidate,
            url,
            int(self.ttl * 1000),
        )
        owner, owner_url, gen, pttl = raw
        return _s(owner), _s(owner_url), int(gen), max(0, int(pttl))

    def _candidate(self) -> tuple[str, str]:
        """The node a new room goes to: the live, not draining node with the most capacity
        left (this node's own load counted as it is now)."""
        best: tuple[float, str, str] | None = None
        hooks = self._hooks
        for nid, info in self._nodes.items():
            if (info.get("draining") == "1" or nid in self._stale) and nid != self.node_id:
                continue
            if nid == self.node_id:
                if self.draining:
                    continue
                members = hooks.load().members if hooks is not None else 0
                url = self.url
            else:
                members = int(info.get("members", "0"))
                url = info.get("url", "")
            free = int(info.get("capacity", "1")) - members - 8 * self._pending.get(nid, 0)
            share = free / max(1, int(info.get("capacity", "1")))
            key = (share, nid, url)
            if best is None or key > best:
                best = key
        if best is None:
            return self.node_id, self.url
        return best[1], best[2]

    async def release(self, room: str) -> None:
        """Give up this node's lease on ``room`` (it closed here)."""
        lease = self.leases.pop(room, None)
        if lease is not None:
            await self.release_lease(room, lease.gen)

    async def release_lease(self, room: str, gen: int) -> None:
        await self.redis.eval(_RELEASE, 1, room_key(room), self.node_id, gen)
        self._count("release", background=True)

    def closed(self, room: str) -> None:
        """``room`` closed on this node: release its lease in the background."""
        if room in self.leases:
            asyncio.get_running_loop().create_task(self._release_quietly(room))

    async def _release_quietly(self, room: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.release(room)

    async def transfer(self, room: str, target: str, url: str) -> bool:
        """Hand ``room``'s lease to node ``target`` (URL ``url``) under a new generation."""
        lease = self.leases.get(room)
        if lease is None:
            return False
        gen = await self.redis.eval(
            _TRANSFER,
            2,
            room_key(room),
            GENERATIONS,
            room,
            self.node_id,
            lease.gen,
            target,
            url,
            int(self.ttl * 1000),
        )
        self._count("transfer", background=True)
        self.leases.pop(room, None)
        return bool(gen)

    # ----------------------------------------------------------------- background

    # Renewals and heartbeats run on a thread of their own with a blocking Redis client: a
    # node whose event loop is saturated (a thousand headsets on a busy machine) still renews
    # its leases in time. The loop only prepares the report (load, rooms) it sends, and the
    # watchdog on the loop stops serving a room whose lease was not renewed in time.

    def _background(self, loop: asyncio.AbstractEventLoop) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                self._renew_sync(loop)
                self._heartbeat_sync()
            except (RedisError, OSError) as exc:
                # Try again soon: the leases run out locally if Redis stays silent.
                log.warning("cluster: redis did not answer (%s)", exc)
                wait = min(0.25, self.interval)
            except Exception:
                log.exception("cluster heartbeat failed")

    def _renew_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        """Renew every lease this node holds, in one round trip (any thread)."""
        held = list(self.leases.items())
        if not held:
            return
        sent = time.monotonic()
        result = self._sync.eval(
            _RENEW,
            len(held),
            *[room_key(room) for room, _ in held],
            self.node_id,
            int(self.ttl * 1000),
            *[lease.gen for _, lease in held],
        )
        self._count("renew", background=True)
        for (room, lease), ok in zip(held, result, strict=True):  # type: ignore[arg-type]
            if ok:
                lease.until = max(lease.until, sent + self.ttl - self._margin)
            else:
                loop.call_soon_threadsafe(self._lost_if, room, lease)

    def _lost_if(self, room: str, lease: _Lease) -> None:
        if self.leases.get(room) is lease:
            self._lost(room, "another node holds its lease")

    def _lost(self, room: str, why: str) -> None:
        self.leases.pop(room, None)
        self.stats.leases_lost += 1
        log.warning("room %s: lease lost (%s); no longer served here", room, why)
        if self._hooks is not None:
            self._hooks.drop_room(room, None)

    async def _watchdog(self) -> None:
        """Stop serving a room the moment its lease may have run out, whether or not Redis
        answers (this loop never waits on Redis); and refresh the report the heartbeat
        thread sends."""
        step = min(0.1, self._margin / 2)
        next_report = 0.0
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for room, lease in list(self.leases.items()):
                if lease.until <= now:
                    self._lost(room, "not renewed in time")
            if now >= next_report:
                self._report = self._make_report()
                next_report = now + self.interval

    def _make_report(self) -> tuple[dict[str, str], str]:
        """This node's entry and its rooms' description, made on the loop."""
        hooks = self._hooks
        load = hooks.load() if hooks is not None else Load(0, 0, 0.0, 0.0)
        now = time.monotonic()
        cpu = time.process_time()
        wall = now - self._cpu[0]
        if wall >= 0.5:
            self._cpu_percent = 100.0 * (cpu - self._cpu[1]) / wall
            self._cpu = (now, cpu)
        info = {
            "url": self.url,
            "capacity": str(self.config.node_capacity),
            "members": str(load.members),
            "rooms": str(load.rooms),
            "tick_p99_ms": f"{load.tick_p99_ms:.3f}",
            "cpu_percent": f"{self._cpu_percent:.1f}",
            "draining": "1" if self.draining else "0",
            "pid": str(os.getpid()),
        }
        described = hooks.describe() if hooks is not None else []
        return info, json.dumps(described)

    def _heartbeat_sync(self) -> None:
        """Write this node's entry (with a time to live) and read every node's (any
        thread)."""
        info, described = self._report
        # Counted by the heartbeat itself (not the report, made on the loop): the others
        # judge whether this node is alive by it changing.
        self._beats += 1
        info = {**info, "beat": str(self._beats)}
        ttl_ms = int(self.ttl * 1000)
        pipe = self._sync.pipeline(transaction=False)
        pipe.hset(node_key(self.node_id), mapping=info)  # type: ignore[arg-type]
        pipe.pexpire(node_key(self.node_id), ttl_ms)
        pipe.set(node_rooms_key(self.node_id), described, px=ttl_ms)
        pipe.sadd(NODES, self.node_id)
        pipe.smembers(NODES)
        result = pipe.execute()
        ids = sorted(_s(x) for x in result[-1])
        nodes: dict[str, dict[str, str]] = {}
        if ids:
            pipe = self._sync.pipeline(transaction=False)
            for nid in ids:
                pipe.hgetall(node_key(nid))
            rows = pipe.execute()
            nodes = {
                nid: {_s(k): _s(v) for k, v in row.items()}
                for nid, row in zip(ids, rows, strict=True)
                if row
            }
        self._count("heartbeat", 2, background=True)
        now = time.monotonic()
        seen = self._beat_seen
        for nid, row in nodes.items():
            beat = row.get("beat", "")
            if nid not in seen or seen[nid][0] != beat:
                seen[nid] = (beat, now)
        for nid in [n for n in seen if n not in nodes]:
            del seen[nid]
        quiet = STALE_BEATS * self.interval
        self._stale = frozenset(
            nid for nid, (_, t) in seen.items() if nid != self.node_id and now - t > quiet
        )
        self._nodes = nodes
        self._seen |= set(nodes)
        self._pending = {}
        gone = [nid for nid in ids if nid not in nodes]
        if gone:
            self._sync.srem(NODES, *gone)
            self._count("heartbeat", background=True)

    async def _read_nodes(self, ids: Sequence[str]) -> dict[str, dict[str, str]]:
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for nid in ids:
                pipe.hgetall(node_key(nid))
            rows = await pipe.execute()
        return {
            nid: {_s(k): _s(v) for k, v in row.items()}
            for nid, row in zip(ids, rows, strict=True)
            if row
        }

    async def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                msg = await pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("cluster: command channel lost (%s); resubscribing", exc)
                await asyncio.sleep(self.interval)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.subscribe(COMMANDS, inbox(self.node_id))
                continue
            if msg is None or msg.get("type") != "message":
                continue
            try:
                cmd = json.loads(msg["data"])
            except (ValueError, TypeError):
                log.warning("cluster: a command that is not JSON was ignored")
                continue
            if not isinstance(cmd, dict):
                continue
            if _s(msg.get("channel", b"")) == inbox(self.node_id):
                self._on_inbox(cmd)
                continue
            try:
                if cmd.get("op") == "drain":
                    if cmd.get("node") in (self.node_id, self.url) and not self.draining:
                        asyncio.get_running_loop().create_task(self.drain())
                elif self._hooks is not None:
                    self._hooks.command(cmd)
            except Exception:
                log.exception("cluster: command %s failed", cmd.get("op"))

    # ----------------------------------------------------------------- moves between nodes

    async def ask_admission(self, node: str, room: str, grant: str) -> None:
        """Ask node ``node``, which runs ``room``, whether the member ``grant`` names may
        enter ``room`` there now. Returns if it may; raises its typed refusal if not, or
        ``room_moving`` (that node is gone, or Redis did not answer) or ``transfer_timeout``
        (no answer within :attr:`transfer_timeout` seconds)."""
        ask_id = secrets.token_hex(8)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asks[ask_id] = answer
        question = {"op": "admit", "id": ask_id, "from": self.node_id, "room": room}
        try:
            try:
                heard = await self.redis.publish(
                    inbox(node), json.dumps(question | {"grant": grant})
                )
            except (RedisError, OSError) as exc:
                raise ProtocolError(
                    ErrorCode.ROOM_MOVING, f"the cluster's directory did not answer ({exc})"
                ) from None
            self._count("transfer_ask")
            if not heard:
                # Nobody listens on its inbox: the node is gone (its rooms move elsewhere).
                raise ProtocolError(
                    ErrorCode.ROOM_MOVING,
                    f"the server that ran room {room} is gone; try again in a moment",
                )
            try:
                reply = await asyncio.wait_for(answer, self.transfer_timeout)
            except TimeoutError:
                raise ProtocolError(
                    ErrorCode.TRANSFER_TIMEOUT,
                    f"the server that runs room {room} did not answer within "
                    f"{self.transfer_timeout:g} s",
                ) from None
        finally:
            self._asks.pop(ask_id, None)
        code = reply.get("code")
        if code is None:
            return
        try:
            err_code = ErrorCode(code)
        except ValueError:
            err_code = ErrorCode.INTERNAL
        raise ProtocolError(err_code, str(reply.get("message", ""))[:1024])

    def _on_inbox(self, msg: dict[str, Any]) -> None:
        """A question from another node (may a member it moves enter a room here?) or the
        answer to one of ours."""
        op, ask_id = msg.get("op"), msg.get("id")
        if not isinstance(ask_id, str):
            return
        if op == "answer":
            waiting = self._asks.get(ask_id)
            if waiting is not None and not waiting.done():
                waiting.set_result(msg)
            return
        asker, room, grant = msg.get("from"), msg.get("room"), msg.get("grant")
        if op != "admit" or not all(isinstance(x, str) for x in (asker, room, grant)):
            return
        assert isinstance(asker, str) and isinstance(room, str) and isinstance(grant, str)
        hooks = self._hooks
        try:
            refusal = hooks.admission(grant, room) if hooks is not None else None
        except Exception:
            log.exception("cluster: admission to room %s failed", room)
            refusal = ProtocolError(ErrorCode.INTERNAL, "internal error")
        reply: dict[str, Any] = {"op": "answer", "id": ask_id}
        if refusal is not None:
            reply |= {"code": refusal.code.value, "message": refusal.message[:1024]}
        task = asyncio.get_running_loop().create_task(self._reply(asker, reply))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _reply(self, node: str, reply: dict[str, Any]) -> None:
        try:
            await self.redis.publish(inbox(node), json.dumps(reply))
            self._count("transfer_answer", background=True)
        except (RedisError, OSError) as exc:  # the asker times out
            log.warning("cluster: could not answer node %s (%s)", node, exc)

    async def redeem_grant(self, jti: str, expires: float) -> bool:
        """Whether the transfer grant named ``jti`` (expiring at ``expires``, Unix seconds) is
        redeemed here for the first time anywhere in the cluster: its ``jti`` is set in Redis
        only if nobody set it before (``SET NX``, kept until the grant has expired), so a grant
        joins once whichever servers it is presented to. Raises RedisError/OSError if Redis
        does not answer."""
        grants = self.grants
        if grants is not None and grants.used(jti):
            return False  # seen here: no round trip
        keep_ms = max(1000, int((expires + 5 - time.time()) * 1000))
        first = await self.redis.set(grant_key(jti), self.node_id, nx=True, px=keep_ms)
        self._count("grant")
        if grants is not None:
            grants.remember(jti, expires)
        return bool(first)

    async def grant_used(self, jti: str) -> bool:
        """Whether the transfer grant named ``jti`` was redeemed anywhere in the cluster
        (checked, not spent: before a redirect to the server that runs its room)."""
        grants = self.grants
        if grants is not None and grants.used(jti):
            return True
        found = await self.redis.exists(grant_key(jti))
        self._count("grant")
        return bool(found)

    # ----------------------------------------------------------------- drain

    async def drain(self) -> None:
        """Stop taking new rooms, move every room of this node to other nodes (their members
        are redirected and resume there), then report that this node may exit."""
        hooks = self._hooks
        assert hooks is not None
        if self.draining:
            return
        self.draining = True
        log.info("node %s draining: %d room(s) to move", self.node_id, len(self.leases))
        self._report = self._make_report()
        with contextlib.suppress(RedisError, OSError):
            await asyncio.to_thread(self._heartbeat_sync)  # others stop placing rooms here
        for room in list(hooks.rooms()):
            target, url = self._candidate()
            moved = False
            if target != self.node_id and room in self.leases:
                # What the room writes at intervals (transforms, viewer panels) is committed
                # before the other node may load it.
                await hooks.persist_room(room)
                try:
                    moved = await self.transfer(room, target, url)
                except (RedisError, OSError) as exc:
                    log.warning("room %s: could not hand over (%s)", room, exc)
            # Members go where the room is now (or, if no node could take it, back through
            # any node once the lease is released).
            if not moved:
                with contextlib.suppress(RedisError, OSError):
                    await self.release(room)
            hooks.drop_room(room, url if moved else None)
        log.info("node %s drained", self.node_id)
        hooks.drained()

    # ----------------------------------------------------------------- operators

    async def publish(self, command: dict[str, Any]) -> int:
        """Send an operator's command to every node (this one included); the number of nodes
        that received it."""
        n = await self.redis.publish(COMMANDS, json.dumps(command))
        self._count("publish", background=True)
        return int(n)

    async def owner(self, room: str) -> tuple[str, str] | None:
        """The node that holds ``room``'s lease and its URL, if any."""
        owner, url = await self.redis.hmget(room_key(room), "owner", "url")  # type: ignore[misc]
        return (_s(owner), _s(url)) if owner is not None else None

    def health(self) -> dict[str, object]:
        s = self.stats
        return {
            "cluster": {
                "node": self.node_id,
                "url": self.url,
                "draining": self.draining,
                "leases": len(self.leases),
                "nodes": len(self._nodes),
                # Nodes whose entry stopped changing (killed moments ago, not yet expired).
                "gone": sorted(self._stale),
                "redis": {
                    "joins": s.joins,
                    "leases_lost": s.leases_lost,
                    "join_round_trips": s.join_round_trips,
                    "background_round_trips": s.background_round_trips,
                    "by_kind": dict(s.by_kind),
                },
            }
        }


# --------------------------------------------------------------------------- directory reads


async def read_nodes(r: aioredis.Redis) -> list[dict[str, str]]:
    """Every live node of the cluster and its last report (for operators and tools)."""
    ids = sorted(_s(x) for x in await r.smembers(NODES))  # type: ignore[misc]
    if not ids:
        return []
    async with r.pipeline(transaction=False) as pipe:
        for nid in ids:
            pipe.hgetall(node_key(nid))
        rows = await pipe.execute()
    out = []
    for nid, row in zip(ids, rows, strict=True):
        if row:
            out.append({"node": nid} | {_s(k): _s(v) for k, v in row.items()})
    return out


async def read_rooms(r: aioredis.Redis) -> list[dict[str, Any]]:
    """Every room of every live node, as its node last described it, with ``node`` and
    ``url`` added (for operators: ``GET /admin/rooms``, ``medverse rooms``)."""
    nodes = await read_nodes(r)
    if not nodes:
        return []
    docs = await r.mget([node_rooms_key(n["node"]) for n in nodes])
    out: list[dict[str, Any]] = []
    for node, doc in zip(nodes, docs, strict=True):
        if doc is None:
            continue
        try:
            rooms = json.loads(doc)
        except ValueError:
            continue
        for room in rooms if isinstance(rooms, list) else []:
            if isinstance(room, dict):
                out.append(room | {"node": node["node"], "url": node.get("url", "")})
    return out


def connect(url: str) -> aioredis.Redis:
    """A Redis client for operators' tools."""
    return aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)


async def run_command(url: str, fn: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
    r = connect(url)
    try:
        return await fn(r)
    finally:
        await r.aclose()


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]" if ":" in host else host


def _safe(config: ServerConfig) -> str:
    """The Redis URL without its password, for the log."""
    url = config.redis_url
    at = url.find("@")
    scheme = url.find("://")
    return url if at < 0 or scheme < 0 else url[: scheme + 3] + "***" + url[at:]
